"""PPO peak memory (RSS): the four roles sharing one base as LoRA adapters vs four separate models, for a
~70M-parameter Llama (12 blocks, d=768). Both sides: the same SFT LoRA adapter as actor and reference, the
same RM LoRA adapter as reward and critic start, 2 iterations of 16 rollouts x 32 new tokens, micro-batch 4 with
gradient checkpointing, fp32 on CPU.
The figure is the process's peak resident set (ru_maxrss), which includes the Python/torch runtime; the
runtime alone (imports, no model) is measured too so the model part can be read off."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, build_model, fmt_ratio, interleaved, parameter_count, peak_rss_bytes, print_table, ran_one_side, ratio, spread, start, write_result

GIB = 1024**3


def prepare(work: Path) -> tuple[Path, Path, Path, Path]:
    demo = work / "demo"
    if not (demo / "data" / "prompts_train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "stages.cli", "demo", "--out", str(demo)], cwd=ROOT, check=True, capture_output=True)
    base = build_model(work / "llama-70m", layers=12, hidden=768, heads=12, vocab_size=512)
    sft, rm = work / "llama-70m-sft-lora", work / "llama-70m-rm-lora"
    common = ["finetuning_type=lora", "max_steps=1", "save_strategy=no", "report_to=none", "use_cpu=true", "max_length=128",
              "per_device_train_batch_size=2", "gradient_accumulation_steps=1", "val_size=0"]
    if not (sft / "adapter_config.json").is_file():
        subprocess.run([sys.executable, "-m", "stages.cli", "sft", f"model_name_or_path={base}", f"output_dir={sft}",
                        f"dataset=[{demo / 'data' / 'sft_train.jsonl'}]", *common], cwd=ROOT, check=True, capture_output=True)
    if not (rm / "adapter_config.json").is_file():
        subprocess.run([sys.executable, "-m", "stages.cli", "rm", f"model_name_or_path={base}", f"output_dir={rm}",
                        f"dataset=[{demo / 'data' / 'prefs_train.jsonl'}]", *common], cwd=ROOT, check=True, capture_output=True)
    return base, sft, rm, demo / "data" / "prompts_train.jsonl"


def ppo_side(work: Path, shared: bool) -> dict:
    import time

    from stages.ppo.train import main

    _base, sft, rm, prompts = prepare(work)
    main([f"model_name_or_path={sft}", f"dataset=[{prompts}]", f"reward_model=[{rm}]", "critic_init=reward",
          "finetuning_type=lora", "lora_rank=16", "lora_alpha=32", f"shared_backbone={str(shared).lower()}",
          f"output_dir={work / f'ppo-memory-{time.time_ns()}'}", "rollout_batch_size=16", "max_prompt_length=64",
          "max_new_tokens=32", "ppo_epochs=1", "per_device_train_batch_size=4", "gradient_accumulation_steps=2",
          "per_device_eval_batch_size=16", "gradient_checkpointing=true",
          "max_steps=2", "save_strategy=no", "report_to=none", "use_cpu=true", "seed=0"])
    return {"peak_rss_bytes": peak_rss_bytes()}


def runtime_side(work: Path) -> dict:
    import stages.ppo.train  # noqa: F401  the same imports, no model
    return {"peak_rss_bytes": peak_rss_bytes()}


def main() -> None:
    args, work = start(__doc__)
    base, *_ = prepare(work)
    if ran_one_side(args, {"shared": lambda: ppo_side(work, True), "separate": lambda: ppo_side(work, False),
                           "runtime": lambda: runtime_side(work)}):
        return
    runs = interleaved("bench.ppo_memory", ["shared", "separate", "runtime"], work, args.repeats)
    shared = [r["peak_rss_bytes"] for r in runs["shared"]]
    separate = [r["peak_rss_bytes"] for r in runs["separate"]]
    runtime = [r["peak_rss_bytes"] for r in runs["runtime"]]
    result = {"parameters": parameter_count(base), "shared_gib": spread([b / GIB for b in shared]),
              "separate_gib": spread([b / GIB for b in separate]), "runtime_gib": spread([b / GIB for b in runtime]),
              "shared_over_separate": ratio(shared, separate),
              "shared_over_separate_without_runtime": ratio([s - r for s, r in zip(shared, runtime)], [s - r for s, r in zip(separate, runtime)]),
              "goal": "<= 0.35x", "runs": runs}
    write_result("ppo_memory", result)
    print_table(f"PPO peak RSS, {result['parameters'] / 1e6:.0f}M-parameter model", [
        ("peak RSS (GiB)", f"{result['shared_gib']['median']:.2f}", f"{result['separate_gib']['median']:.2f}", fmt_ratio(result["shared_over_separate"])),
        ("minus the runtime alone", f"{result['shared_gib']['median'] - result['runtime_gib']['median']:.2f}",
         f"{result['separate_gib']['median'] - result['runtime_gib']['median']:.2f}", fmt_ratio(result["shared_over_separate_without_runtime"]))],
        ("", "shared backbone", "four separate models", "shared / separate"))


if __name__ == "__main__":
    main()
