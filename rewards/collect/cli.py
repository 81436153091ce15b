"""``tristage collect`` / ``launch/run_stage.sh collect``: human preference collection.

    tristage collect token --db runs/collect/labels.db --name alice [--admin]   # prints alice's link
    tristage collect add   --db ... --pairs runs/demo/eval/pairs_for_collect.jsonl
    tristage collect add   --db ... --models runs/demo/sft runs/demo/ppo --prompts prompts.jsonl
    tristage collect serve --db ... [--init] [--labels-per-item 3] [--lease-seconds 600] [--host 127.0.0.1] [--port 8765]
    tristage collect stats --db ...
    tristage collect export --db ... --out prefs.jsonl [--ties drop|tie] [--min-answers 2]

Items are pairs of responses to a prompt: from eval's exported pairs, from a file of candidate pairs
(``prompt`` + ``response_a``/``response_b``, or ``responses: [x, y]``), or sampled from one model (two
samples) or two models (one each); A/B order is randomized (seeded) and the source of each side recorded.
An item is its content: the same prompt and pair added again, from any file, is the same item.
Only ``add``, ``token`` and ``serve --init`` create a database; ``stats`` and ``export`` only read it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from stages.common.errors import ConfigError, DataError

from .store import LabelStore


def _text(value, source: str, number: int, field: str) -> str:
    """A string that is text: JSON's "\\ud800" escape gives a lone surrogate, which no database or page can hold."""
    if not isinstance(value, str):
        raise DataError(source, "missing or not a string", record=number, field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(source, "holds a lone surrogate (an unpaired \\ud800-\\udfff escape), not text", record=number, field=field) from None
    return value


def _prompt(record: dict, source: str, number: int) -> list[dict]:
    prompt = record.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": _text(prompt, source, number, "prompt")}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
        messages = [{**m, "content": _text(m["content"], source, number, f"prompt[{i}].content")} for i, m in enumerate(prompt)]
    else:
        raise DataError(source, "must be a non-empty string or a list of {role, content} messages", record=number, field="prompt")
    from stages.common.data import with_system

    system = _text(record["system"], source, number, "system") if record.get("system") is not None else None
    return with_system(messages, system)


def items_from_pairs(path: str, seed: int = 0) -> list[dict]:
    from stages.common.data import read_local_records

    rng = random.Random(seed)
    items = []
    for number, record in enumerate(read_local_records(path), start=1):
        if not isinstance(record, dict):
            raise DataError(path, "must be an object", record=number)
        if "responses" in record:
            responses = record["responses"]
            if not (isinstance(responses, list) and len(responses) == 2):
                raise DataError(path, "must be a list of two strings", record=number, field="responses")
            responses = [_text(r, path, number, f"responses[{i}]") for i, r in enumerate(responses)]
            sources = record.get("sources", ["response 1", "response 2"])
            if not (isinstance(sources, list) and len(sources) == 2):
                raise DataError(path, "must be a list of two strings, one per response", record=number, field="sources")
            sources = [_text(r, path, number, f"sources[{i}]") for i, r in enumerate(sources)]
            order = [0, 1] if rng.random() < 0.5 else [1, 0]
            a, b = responses[order[0]], responses[order[1]]
            source_a, source_b = sources[order[0]], sources[order[1]]
        else:
            a, b = (_text(record.get(key), path, number, key) for key in ("response_a", "response_b"))
            source_a, source_b = (_text(record[key], path, number, key) if record.get(key) is not None else None
                                  for key in ("source_a", "source_b"))
        prompt = _prompt(record, path, number)
        items.append({"prompt": prompt, "response_a": a, "response_b": b, "source_a": source_a, "source_b": source_b})
    return items


def items_from_models(models: list[str], prompts_file: str, seed: int, max_new_tokens: int, temperature: float,
                      max_prompt_length: int, batch_size: int, rollout_engine: str = "hf") -> list[dict]:
    """Two responses per prompt: one from each of two models, or two samples of one model."""
    import torch

    from stages.common.backbone import load_tokenizer
    from stages.common.config import DataArguments, ModelArguments
    from stages.common.data import build_prompt_data
    from stages.common.generation import SamplingArguments, sample_responses
    from stages.common.loading import load_policy
    from stages.common.rollout import RolloutArguments, engine_for

    if len(models) not in (1, 2):
        raise ConfigError("give one model (two samples per prompt) or two models (one response each)", key="--models")
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=models[0]))
    sampling = SamplingArguments(max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens, temperature=temperature)
    prompts = build_prompt_data(DataArguments(dataset=[prompts_file]), tokenizer, seed=seed, max_prompt_length=max_prompt_length).train
    texts, engine, n = [], None, 2 if len(models) == 1 else 1
    rollout = RolloutArguments(rollout_engine=rollout_engine)
    for path in models:
        model = load_policy(path).eval()
        engine = engine_for(rollout, model, path, tokenizer, sampling, batch_size, torch.device("cpu"), torch.float32,
                            len(prompts) * n, seed, previous=engine)
        texts.append(sample_responses(engine, tokenizer, prompts, n, batch_size, seed)["texts"])
    rng = random.Random(seed)
    items = []
    for i, prompt in enumerate(prompts):
        if len(models) == 1:
            pair = [(texts[0][2 * i], f"{models[0]}#1"), (texts[0][2 * i + 1], f"{models[0]}#2")]
        else:
            pair = [(texts[0][i], models[0]), (texts[1][i], models[1])]
        rng.shuffle(pair)
        items.append({"prompt": prompt["prompt"], "response_a": pair[0][0],
                      "response_b": pair[1][0], "source_a": pair[0][1], "source_b": pair[1][1]})
    return items


def _check(args) -> None:
    """The numbers and paths, before any database is opened or model loaded."""
    for name, low in (("labels_per_item", 1), ("min_answers", 1), ("lease_seconds", 1), ("port", 0)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ConfigError(f"must be at least {low}, not {value}", key="--" + name.replace("_", "-"))
    if getattr(args, "ties", None) == "margin0":
        raise ConfigError("margin0 is gone: it exported a tie as a full-strength preference for whichever side was shown "
                          "as A; use drop (leave ties out) or tie (records with \"tie\": true, which the reward model "
                          "learns as p = 0.5)", key="--ties")
    out = getattr(args, "out", None)
    if out is not None and not Path(out).resolve().parent.is_dir():
        raise ConfigError(f"{out}: the folder {Path(out).resolve().parent} does not exist", key="--out")
    if getattr(args, "models", None) and not args.prompts:
        raise ConfigError("--models needs --prompts", key="--prompts")
    if getattr(args, "models", None) and args.rollout_engine == "vllm":
        from stages.common.loading import adapter_base_path
        from stages.common.rollout.vllm_engine import check_vllm_can_load

        for path in args.models:
            check_vllm_can_load(adapter_base_path(path) or path, key="--rollout-engine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tristage collect", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("token", "add", "serve", "stats", "export"):
        sub = commands.add_parser(name)
        sub.add_argument("--db", default="runs/collect/labels.db",
                         help="the SQLite database (add, token and serve --init create it; the others need it to exist)")
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
            sub.add_argument("--rollout-engine", choices=["hf", "vllm"], default="hf",
                             help="--models: sample with transformers' generate or a vLLM engine")
            sub.add_argument("--seed", type=int, default=0)
        if name in ("serve", "stats"):
            sub.add_argument("--labels-per-item", type=int, default=1, help="k: answers an item needs before it leaves the queue")
        if name == "serve":
            sub.add_argument("--init", action="store_true", help="create the database if it does not exist")
            sub.add_argument("--lease-seconds", type=float, default=600.0,
                             help="an item served to an annotator is reserved for them this long (and counts toward k)")
            sub.add_argument("--host", default="127.0.0.1", help="127.0.0.1 unless you mean to expose it")
            sub.add_argument("--port", type=int, default=8765)
        if name == "export":
            sub.add_argument("--out", required=True)
            sub.add_argument("--ties", choices=["drop", "tie", "margin0"], default="drop",
                             help="a majority tie: drop it, or write it with \"tie\": true (the RM learns p = 0.5)")
            sub.add_argument("--min-answers", type=int, default=1)
    args = parser.parse_args(argv)
    _check(args)
    store = LabelStore(args.db, create=args.command in ("token", "add") or (args.command == "serve" and args.init),
                       read_only=args.command in ("stats", "export"))

    if args.command == "token":
        token = store.create_annotator(args.name, admin=args.admin)
        page = "/admin" if args.admin else "/"
        print(f"{args.name}: {args.url}{page}#token={token}")
        return 0
    if args.command in ("add", "serve"):
        items = [item for path in args.pairs for item in items_from_pairs(path, args.seed)]
        if args.models:
            items += items_from_models(args.models, args.prompts, args.seed, args.max_new_tokens, args.temperature,
                                       args.max_prompt_length, args.batch_size, args.rollout_engine)
        if items:
            print(f"[tristage] collect: {store.add_items(items)} new item(s) of {len(items)} in {args.db}", flush=True)
    if args.command == "serve":
        import uvicorn

        from .app import create_app

        print(f"[tristage] collect: serving http://{args.host}:{args.port}/ (annotators open their #token= link; "
              f"admin page /admin), {args.labels_per_item} answer(s) per item, leases of {args.lease_seconds:g} s", flush=True)
        uvicorn.run(create_app(store, args.labels_per_item, args.lease_seconds), host=args.host, port=args.port, log_level="warning")
        return 0
    if args.command == "stats":
        from .report import collection_stats

        print(json.dumps(collection_stats(store, args.labels_per_item), indent=2))
        return 0
    if args.command == "export":
        from .report import export_store

        counts = export_store(store, args.out, ties=args.ties, min_answers=args.min_answers)
        print(f"[tristage] collect: {counts['pairs']} preference pairs and {counts['ties']} ties -> {args.out} ({counts})")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
