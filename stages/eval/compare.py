"""Compare models on held-out prompts: SFT-only vs RLHF by default (one model is scored; two or more are also
compared pairwise).

    tristage eval --config configs/demo/eval.yaml [key=value ...]

Reads top to bottom: config -> prompts -> for each model: the same seeded sampling of every prompt,
its KL to the reference model -> every judge scores every response -> means with bootstrap CIs, pairwise
win rates (paired by prompt and sample index, ties count half), length and no-EOS rate, BLEU / ROUGE-L
against the prompts' reference answers where they carry one (stages/eval/references.py) -> a rich table,
eval_report.json, eval_report.png, responses.jsonl, and optionally the pairs for human annotators.

All built-in judges score one response at a time, so the order in which two responses are shown cannot
matter to them; the exported pairs for humans are shown in a randomized A/B order.
"""
from __future__ import annotations

import gc
import itertools
import json
import random
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from rewards.sources import build_source
from stages.common.backbone import load_tokenizer
from stages.common.loading import inference_device, inference_dtype, load_policy
from stages.common.config import ModelArguments, parse_config
from stages.common.data import build_prompt_data
from stages.common.generation import sample_responses, sequence_logprobs
from stages.common.rollout import engine_for

from .config import ARGUMENTS
from .references import reference_scores, resolve_tokenizer
from .stats import mean_with_ci, win_rate_with_ci

REPORT_FILE, FIGURE_FILE, RESPONSES_FILE = "eval_report.json", "eval_report.png", "responses.jsonl"


def model_names(eval_args) -> list[str]:
    if eval_args.model_names:
        return list(eval_args.model_names)
    names = [Path(m).name or m for m in eval_args.models]
    return names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_models(eval_args, rollout_args, names: list[str], tokenizer, prompts: list[dict], sampling, device, dtype) -> dict:
    """Each model's responses and their KL to the reference, with one model in memory besides the reference. The
    reference loads once and, when it is one of the models (by default the first), is that model; everything is
    freed before the judges load. A vLLM engine starts once and is given each model's weights in turn."""
    reference_path = eval_args.reference_model or eval_args.models[0]
    reference = load_policy(reference_path, dtype=dtype, device=device).eval()
    samples, engine, rows = {}, None, len(prompts) * eval_args.samples_per_prompt
    for name, path in zip(names, eval_args.models):
        is_reference = Path(path).resolve() == Path(reference_path).resolve()
        model = reference if is_reference else load_policy(path, dtype=dtype, device=device).eval()
        print(f"[tristage] eval: sampling {len(prompts)} x {eval_args.samples_per_prompt} responses from {name} ({path}) "
              f"with {rollout_args.rollout_engine}", flush=True)
        engine = engine_for(rollout_args, model, path, tokenizer, sampling, eval_args.batch_size, device, dtype, rows, eval_args.seed,
                            previous=engine, model_defaults=eval_args.use_model_generation_config)
        samples[name] = sample_responses(engine, tokenizer, prompts, eval_args.samples_per_prompt, eval_args.batch_size,
                                         eval_args.seed)
        own = sequence_logprobs(model, samples[name]["batches"], sampling.temperature)
        ref = own if is_reference else sequence_logprobs(reference, samples[name]["batches"], sampling.temperature)
        samples[name]["kl"] = [a - b for a, b in zip(own, ref)]  # E_model[log model - log ref] = KL(model || ref)
        del model
        release_memory()
    del reference, engine
    release_memory()
    return samples


def score_with_judges(eval_args, settings, prompt_messages: list[list[dict]], texts: dict[str, list[str]], device, dtype) -> dict:
    """{model: {judge: scores}}; each judge is built (a reward model loaded) once for all models."""
    scores: dict[str, dict] = {name: {} for name in texts}
    for spec in eval_args.judges:
        judge = build_source(spec, eval_args.judge_normalize, eval_args.judge_batch_size, settings, dtype=dtype, device=device)
        for name, model_texts in texts.items():
            raw, normalized = judge(prompt_messages, model_texts)
            scores[name][spec] = normalized if eval_args.judge_normalize else raw
        del judge
        release_memory()
    return scores


def plot_report(report: dict, scores: dict, judge: str, out_file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.boxplot([np.ravel(scores[name][judge]) for name in names], showmeans=True)
    left.set_xticks(range(1, len(names) + 1), names)
    left.set_title(f"score distribution ({judge})", fontsize=9)
    for name in names:
        model = report["models"][name]
        mean, lo, hi = model["judges"][judge]["mean"], *model["judges"][judge]["ci"]
        kl = model["kl_to_reference"]["mean"]
        right.errorbar([kl], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", capsize=4, label=name)
    right.set_xlabel("KL to reference (nats per response)")
    right.set_ylabel(f"mean {judge}")
    right.set_title("reward vs KL", fontsize=9)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_file, dpi=110)
    plt.close(figure)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    judges = report["settings"]["judges"]
    table = Table(title=f"eval: {report['settings']['num_prompts']} prompts x {report['settings']['samples_per_prompt']} samples",
                  header_style="bold")
    table.add_column("model")
    for judge in judges:
        table.add_column(f"{judge} (95% CI)", justify="right")
    metrics = [m for m in ("bleu", "rouge_l") if report["settings"].get("reference_prompts")]
    for metric in metrics:
        table.add_column(f"{'BLEU' if metric == 'bleu' else 'ROUGE-L'} (95% CI)", justify="right")
    for column in ("KL to ref", "length", "no EOS"):
        table.add_column(column, justify="right")
    for name, model in report["models"].items():
        cells = [f"{model['judges'][j]['mean']:.3f} [{model['judges'][j]['ci'][0]:.3f}, {model['judges'][j]['ci'][1]:.3f}]" for j in judges]
        cells += [f"{model['references'][m]['mean']:.1f} [{model['references'][m]['ci'][0]:.1f}, {model['references'][m]['ci'][1]:.1f}]"
                  for m in metrics]
        table.add_row(name, *cells, f"{model['kl_to_reference']['mean']:.2f}", f"{model['response_length']:.1f}",
                      f"{100 * model['no_eos_rate']:.0f}%")
    console.print(table)
    wins = Table(title="pairwise win rates (ties count half)", header_style="bold")
    for column in ("A", "B", "judge", "A wins (95% CI)"):
        wins.add_column(column)
    for row in report["win_rates"]:
        wins.add_row(row["a"], row["b"], row["judge"], f"{100 * row['win_rate']:.1f}% [{100 * row['ci'][0]:.1f}, {100 * row['ci'][1]:.1f}]")
    console.print(wins)
    for example in report["examples"]:
        console.print(f"[bold]prompt:[/bold] {example['prompt']}", highlight=False, markup=True)
        for name, text in example["responses"].items():
            console.print(f"  [cyan]{name}[/cyan]: {text}", highlight=False)


def export_pairs(path: str, prompts: list[dict], names: list[str], texts: dict, samples: int, seed: int) -> int:
    """Every pair of models' responses to the same prompt and sample index, A/B order randomized."""
    rng = random.Random(seed)
    count = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for a, b in itertools.combinations(names, 2):
            for i, prompt in enumerate(prompts):
                for s in range(samples):
                    k = i * samples + s
                    first, second = (a, b) if rng.random() < 0.5 else (b, a)
                    f.write(json.dumps({"id": f"{a}|{b}|{k}", "prompt": prompt["prompt"], "response_a": texts[first][k],
                                        "response_b": texts[second][k], "source_a": first, "source_b": second},
                                       ensure_ascii=False) + "\n")
                    count += 1
    return count


def main(argv: list[str] | None = None) -> dict:
    data_args, eval_args, sampling, rollout_args, reward_settings = parse_config(sys.argv[1:] if argv is None else argv, ARGUMENTS)
    eval_args.validate(rollout_args)
    names = model_names(eval_args)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=eval_args.models[0]))
    prompts = build_prompt_data(data_args, tokenizer, seed=eval_args.seed, max_prompt_length=sampling.max_prompt_length).train
    out = Path(eval_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    device = inference_device(eval_args.device)
    dtype = inference_dtype(eval_args.dtype, device)
    samples = sample_models(eval_args, rollout_args, names, tokenizer, prompts, sampling, device, dtype)

    shape = (len(prompts), eval_args.samples_per_prompt)
    prompt_messages = [p["prompt"] for p in prompts for _ in range(eval_args.samples_per_prompt)]
    judged = score_with_judges(eval_args, reward_settings, prompt_messages, {n: samples[n]["texts"] for n in names}, device, dtype)
    scores = {name: {judge: np.array(values).reshape(shape) for judge, values in judged[name].items()} for name in names}

    rounds, seed = eval_args.bootstrap_samples, eval_args.seed
    report = {"settings": {**asdict(eval_args), **asdict(sampling), **asdict(rollout_args), "model_names": names, "num_prompts": len(prompts),
                           "datasets": data_args.dataset, "loaded_as": {"device": str(device), "dtype": str(dtype).split(".")[-1]}},
              "models": {}, "win_rates": [], "examples": []}
    with_reference = [i for i, p in enumerate(prompts) if p.get("reference")]
    if with_reference:  # BLEU / ROUGE-L on the prompts that carry a reference answer
        references = [prompts[i]["reference"] for i in with_reference]
        tokenize = resolve_tokenizer(eval_args.reference_tokenize, references)
        report["settings"].update({"reference_prompts": len(with_reference), "reference_tokenize_used": tokenize})
    for name, path in zip(names, eval_args.models):
        kl = np.array(samples[name]["kl"]).reshape(shape)
        report["models"][name] = {
            "path": path,
            "judges": {j: dict(zip(("mean", "ci"), _split(mean_with_ci(scores[name][j], rounds, seed)))) for j in eval_args.judges},
            "kl_to_reference": dict(zip(("mean", "ci"), _split(mean_with_ci(kl, rounds, seed)))),
            "response_length": float(np.mean(samples[name]["lengths"])),
            "no_eos_rate": float(1.0 - np.mean(samples[name]["ended"])),
        }
        if with_reference:
            per_prompt = np.array(samples[name]["texts"], dtype=object).reshape(shape)[with_reference].reshape(-1).tolist()
            report["models"][name]["references"] = reference_scores(per_prompt, references, eval_args.samples_per_prompt, tokenize,
                                                                    rounds, seed)
    for earlier, later in itertools.combinations(names, 2):  # e.g. how often RLHF beats SFT-only
        for judge in eval_args.judges:
            rate, lo, hi = win_rate_with_ci(scores[later][judge], scores[earlier][judge], rounds, seed)
            report["win_rates"].append({"a": later, "b": earlier, "judge": judge, "win_rate": rate, "ci": [lo, hi]})
    for i in range(min(eval_args.num_examples, len(prompts))):
        k = i * eval_args.samples_per_prompt
        report["examples"].append({"prompt": prompts[i]["prompt"][-1]["content"],
                                   "responses": {n: samples[n]["texts"][k] for n in names}})

    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    with open(out / RESPONSES_FILE, "w", encoding="utf-8") as f:
        for name in names:
            for k, text in enumerate(samples[name]["texts"]):
                f.write(json.dumps({"model": name, "prompt": prompt_messages[k], "response": text,
                                    **{j: float(scores[name][j].flat[k]) for j in eval_args.judges}}, ensure_ascii=False) + "\n")
    plot_report(report, scores, eval_args.judges[0], out / FIGURE_FILE)
    if eval_args.export_pairs and eval_args.export_pairs.lower() not in ("none", "false", "no"):
        count = export_pairs(eval_args.export_pairs, prompts, names, {n: samples[n]["texts"] for n in names},
                             eval_args.samples_per_prompt, seed)
        print(f"[tristage] eval: {count} pairs for annotators in {eval_args.export_pairs}")
    print_report(report)
    print(f"[tristage] eval: report in {out / REPORT_FILE}, figure in {out / FIGURE_FILE}")
    return report


def _split(triple: tuple[float, float, float]) -> tuple[float, list[float]]:
    return triple[0], [triple[1], triple[2]]
