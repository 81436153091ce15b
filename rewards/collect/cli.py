"""``tristage collect`` / ``launch/run_stage.sh collect``: human preference collection.

    tristage collect token --db runs/collect/labels.db --name alice [--admin]   # prints alice's link
    tristage collect add   --db ... --pairs runs/demo/eval/pairs_for_collect.jsonl
    tristage collect add   --db ... --models runs/demo/sft runs/demo/ppo --prompts prompts.jsonl
    tristage collect serve --db ... [--labels-per-item 3] [--host 127.0.0.1] [--port 8765]
    tristage collect stats --db ...
    tristage collect export --db ... --out prefs.jsonl [--ties drop|margin0] [--min-answers 2]

Items are pairs of responses to a prompt: from eval's exported pairs, from a file of candidate pairs
(``prompt`` + ``response_a``/``response_b``, or ``responses: [x, y]``), or sampled from one model (two
samples) or two models (one each); A/B order is randomized (seeded) and the source of each side recorded.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from stages.common.errors import DataError

from .store import LabelStore


def _prompt(record: dict, source: str, number: int) -> list[dict]:
    prompt = record.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
        messages = prompt
    else:
        raise DataError(source, "must be a non-empty string or a list of {role, content} messages", record=number, field="prompt")
    from stages.common.data import with_system

    return with_system(messages, record["system"] if isinstance(record.get("system"), str) else None)


def items_from_pairs(path: str, seed: int = 0) -> list[dict]:
    from stages.common.data import read_local_records

    rng = random.Random(seed)
    items = []
    for number, record in enumerate(read_local_records(path), start=1):
        if not isinstance(record, dict):
            raise DataError(path, "must be an object", record=number)
        if "responses" in record:
            responses = record["responses"]
            if not (isinstance(responses, list) and len(responses) == 2 and all(isinstance(r, str) for r in responses)):
                raise DataError(path, "must be a list of two strings", record=number, field="responses")
            sources = record.get("sources") or ["response 1", "response 2"]
            order = [0, 1] if rng.random() < 0.5 else [1, 0]
            a, b = responses[order[0]], responses[order[1]]
            source_a, source_b = sources[order[0]], sources[order[1]]
        else:
            for key in ("response_a", "response_b"):
                if not isinstance(record.get(key), str):
                    raise DataError(path, "missing or not a string", record=number, field=key)
            a, b, source_a, source_b = record["response_a"], record["response_b"], record.get("source_a"), record.get("source_b")
        prompt = _prompt(record, path, number)
        key = str(record.get("id") or f"{Path(path).name}:{number}")
        items.append({"key": key, "prompt": prompt, "response_a": a, "response_b": b, "source_a": source_a, "source_b": source_b})
    return items


def items_from_models(models: list[str], prompts_file: str, seed: int, max_new_tokens: int, temperature: float,
                      max_prompt_length: int, batch_size: int) -> list[dict]:
    """Two responses per prompt: one from each of two models, or two samples of one model."""
    from stages.common.backbone import load_tokenizer
    from stages.common.loading import load_policy
    from stages.common.config import DataArguments, ModelArguments
    from stages.common.data import build_prompt_data
    from stages.common.generation import SamplingArguments, sample_responses

    if len(models) not in (1, 2):
        raise DataError("models", "give one model (two samples per prompt) or two models (one response each)")
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=models[0]))
    sampling = SamplingArguments(max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens, temperature=temperature)
    prompts = build_prompt_data(DataArguments(dataset=[prompts_file]), tokenizer, seed=seed, max_prompt_length=max_prompt_length).train
    texts = []
    for path in models:
        texts.append(sample_responses(load_policy(path).eval(), tokenizer, prompts, sampling, samples_per_prompt=2 if len(models) == 1 else 1,
                                      batch_size=batch_size, seed=seed)["texts"])
    rng = random.Random(seed)
    items = []
    for i, prompt in enumerate(prompts):
        if len(models) == 1:
            pair = [(texts[0][2 * i], f"{models[0]}#1"), (texts[0][2 * i + 1], f"{models[0]}#2")]
        else:
            pair = [(texts[0][i], models[0]), (texts[1][i], models[1])]
        rng.shuffle(pair)
        items.append({"key": f"{'|'.join(models)}:{prompts_file}:{seed}:{i}", "prompt": prompt["prompt"], "response_a": pair[0][0],
                      "response_b": pair[1][0], "source_a": pair[0][1], "source_b": pair[1][1]})
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tristage collect", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("token", "add", "serve", "stats", "export"):
        sub = commands.add_parser(name)
        sub.add_argument("--db", default="runs/collect/labels.db", help="the SQLite database (created if missing)")
        if name == "token":
            sub.add_argument("--name", required=True)
            sub.add_argument("--admin", action="store_true")
            sub.add_argument("--url", default="http://127.0.0.1:8765")
        if name in ("add", "serve"):
            sub.add_argument("--pairs", action="append", default=[], help="a file of pairs (eval's export_pairs, or candidates)")
            sub.add_argument("--models", nargs="+", default=None, help="one or two model directories to sample from")
            sub.add_argument("--prompts", default=None, help="prompts for --models (any registry format)")
            sub.add_argument("--max-new-tokens", type=int, default=256)
            sub.add_argument("--temperature", type=float, default=1.0)
            sub.add_argument("--max-prompt-length", type=int, default=1024,
                             help="--models: prompts longer than this many tokens keep their last ones")
            sub.add_argument("--batch-size", type=int, default=32, help="--models: rows per generate call")
            sub.add_argument("--seed", type=int, default=0)
        if name in ("serve", "stats"):
            sub.add_argument("--labels-per-item", type=int, default=1, help="k: answers an item needs before it leaves the queue")
        if name == "serve":
            sub.add_argument("--host", default="127.0.0.1", help="127.0.0.1 unless you mean to expose it")
            sub.add_argument("--port", type=int, default=8765)
        if name == "export":
            sub.add_argument("--out", required=True)
            sub.add_argument("--ties", choices=["drop", "margin0"], default="drop")
            sub.add_argument("--min-answers", type=int, default=1)
    args = parser.parse_args(argv)
    store = LabelStore(args.db)

    if args.command == "token":
        token = store.create_annotator(args.name, admin=args.admin)
        page = "/admin" if args.admin else "/"
        print(f"{args.name}: {args.url}{page}#token={token}")
        return 0
    if args.command in ("add", "serve"):
        items = [item for path in args.pairs for item in items_from_pairs(path, args.seed)]
        if args.models:
            if not args.prompts:
                raise DataError("prompts", "--models needs --prompts")
            items += items_from_models(args.models, args.prompts, args.seed, args.max_new_tokens, args.temperature,
                                       args.max_prompt_length, args.batch_size)
        if items:
            print(f"[tristage] collect: {store.add_items(items)} new item(s) of {len(items)} in {args.db}", flush=True)
    if args.command == "serve":
        import uvicorn

        from .app import create_app

        print(f"[tristage] collect: serving http://{args.host}:{args.port}/ (annotators open their #token= link; "
              f"admin page /admin), {args.labels_per_item} answer(s) per item", flush=True)
        uvicorn.run(create_app(store, args.labels_per_item), host=args.host, port=args.port, log_level="warning")
        return 0
    if args.command == "stats":
        from .report import collection_stats

        print(json.dumps(collection_stats(store, args.labels_per_item), indent=2))
        return 0
    if args.command == "export":
        from .report import export_store

        counts = export_store(store, args.out, ties=args.ties, min_answers=args.min_answers)
        print(f"[tristage] collect: {counts['pairs']} preference pairs -> {args.out} ({counts})")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
