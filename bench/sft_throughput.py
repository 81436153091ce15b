"""SFT throughput on a ~21M-parameter Llama (8 blocks, d=512), fp32 on CPU:
- tristage SFT vs TRL's SFTTrainer used directly: same model, the same length-skewed records (the demo's shop
  answers, one in five made 6x longer), chat template, max_length 512, batch 8, one epoch, no packing on
  either side; throughput = real (non-pad) tokens of the epoch / training-loop seconds;
- tristage packing vs padding on that data (real tokens/s);
- achieved FLOP/s (6 x parameters x real tokens/s, packing on) against this machine's fp32 matmul peak
  (the best of torch.mm on 2048 x 2048 matrices, same threads)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, build_model, fmt_ratio, interleaved, parameter_count, print_table, ran_one_side, ratio, spread, start, write_result

BATCH, MAX_LENGTH = 8, 512


def prepare(work: Path) -> tuple[Path, Path]:
    demo = work / "demo"
    if not (demo / "data" / "sft_train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "stages.cli", "demo", "--out", str(demo)], cwd=ROOT, check=True, capture_output=True)
    model = build_model(work / "llama-21m", layers=8, hidden=512, heads=8, vocab_size=512)
    data = work / "sft_skewed.jsonl"
    if not data.is_file():
        rng = random.Random(0)
        rows = [json.loads(line) for line in (demo / "data" / "sft_train.jsonl").read_text().splitlines()]
        skewed = [{**r, "output": " ".join([r["output"]] * (6 if rng.random() < 0.2 else 1))} for r in rows]
        data.write_text("".join(json.dumps(r) + "\n" for r in skewed))
    return model, data


def real_tokens(model: Path, data: Path) -> int:
    """Non-pad tokens of one epoch as both sides see them (the chat template applied to every record)."""
    from stages.common.backbone import load_tokenizer
    from stages.common.config import DataArguments, ModelArguments
    from stages.common.data import build_sft_data

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model)))
    rows = build_sft_data(DataArguments(dataset=[str(data)], max_length=MAX_LENGTH), tokenizer, seed=0).train
    return sum(len(r["input_ids"]) for r in rows)


def tristage_side(work: Path, model: Path, data: Path, packing: bool) -> dict:
    from stages.sft.train import main

    out = work / f"tristage-sft-{time.time_ns()}"
    main([f"model_name_or_path={model}", f"dataset=[{data}]", "finetuning_type=full", f"output_dir={out}",
          f"max_length={MAX_LENGTH}", f"packing={str(packing).lower()}", f"per_device_train_batch_size={BATCH}",
          "gradient_accumulation_steps=1", "num_train_epochs=1", "learning_rate=1e-4", "save_strategy=no", "report_to=none",
          "logging_steps=1", "seed=0", "use_cpu=true"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": metrics[-1]["time"], "steps": len(metrics)}


def trl_side(work: Path, model_dir: Path, data: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from stages.common.backbone import load_tokenizer
    from stages.common.config import ModelArguments

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model_dir)))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{"messages": [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["instruction"]},
                                               {"role": "assistant", "content": r["output"]}]} for r in rows])
    config = SFTConfig(output_dir=str(work / f"trl-sft-{time.time_ns()}"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                       num_train_epochs=1, learning_rate=1e-4, max_length=MAX_LENGTH, packing=False, logging_steps=1,
                       save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0, dataset_num_proc=1)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=config, train_dataset=dataset, processing_class=tokenizer)
    output = trainer.train()
    return {"seconds": output.metrics["train_runtime"], "steps": output.global_step}


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def main() -> None:
    args, work = start(__doc__)
    model, data = prepare(work)
    if ran_one_side(args, {"tristage-padding": lambda: tristage_side(work, model, data, packing=False),
                           "tristage-packing": lambda: tristage_side(work, model, data, packing=True),
                           "trl": lambda: trl_side(work, model, data), "matmul": lambda: {"flops": matmul_peak_flops()}}):
        return
    runs = interleaved("bench.sft_throughput", ["tristage-padding", "trl", "tristage-packing", "matmul"], work, args.repeats)
    tokens = real_tokens(model, data)
    params = parameter_count(model)
    tps = {side: [tokens / r["seconds"] for r in runs[side]] for side in ("tristage-padding", "tristage-packing", "trl")}
    flops = [6 * params * t for t in tps["tristage-packing"]]
    peak = [r["flops"] for r in runs["matmul"]]
    result = {"parameters": params, "real_tokens_per_epoch": tokens,
              "tokens_per_second": {side: spread(v) for side, v in tps.items()},
              "tristage_over_trl": ratio(tps["tristage-padding"], tps["trl"]),
              "packing_over_padding": ratio(tps["tristage-packing"], tps["tristage-padding"]),
              "achieved_flops": spread(flops), "matmul_peak_flops": spread(peak), "fraction_of_peak": ratio(flops, peak),
              "goals": {"packing_over_padding": ">= 1.5x", "fraction_of_peak": ">= 0.40"}, "runs": runs}
    write_result("sft_throughput", result)
    print_table(f"SFT, {params / 1e6:.0f}M parameters, real tokens/s", [
        ("tristage vs TRL SFTTrainer (both padding)", f"{spread(tps['tristage-padding'])['median']:.0f}", f"{spread(tps['trl'])['median']:.0f}",
         fmt_ratio(result["tristage_over_trl"])),
        ("tristage packing vs padding", f"{spread(tps['tristage-packing'])['median']:.0f}", f"{spread(tps['tristage-padding'])['median']:.0f}",
         fmt_ratio(result["packing_over_padding"])),
        ("achieved / fp32 matmul peak (GFLOP/s)", f"{spread(flops)['median'] / 1e9:.1f}", f"{spread(peak)['median'] / 1e9:.1f}",
         fmt_ratio(result["fraction_of_peak"]))], ("", "ours", "peer / baseline", "ratio"))


if __name__ == "__main__":
    main()
