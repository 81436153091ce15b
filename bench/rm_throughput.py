"""Reward-model throughput: tristage's RM stage vs TRL's RewardTrainer used directly, same ~21M-parameter
Llama (8 blocks, d=512), 256 of the demo's preference pairs with the same chat template, batch 8 pairs,
max_length 512, one epoch, fp32 on CPU. Pairs/s = pairs of the epoch / training-loop seconds."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fmt_ratio, interleaved, print_table, ran_one_side, ratio, spread, start, write_result
from bench.sft_throughput import prepare as prepare_sft

BATCH, MAX_LENGTH = 8, 512


def prepare(work: Path) -> tuple[Path, Path]:
    model, _ = prepare_sft(work)
    data = work / "prefs_256.jsonl"
    if not data.is_file():
        data.write_text("".join((work / "demo" / "data" / "prefs_train.jsonl").read_text().splitlines(keepends=True)[:256]))
    return model, data


def tristage_side(work: Path, model: Path, data: Path) -> dict:
    from stages.rm.train import main

    out = work / f"tristage-rm-{time.time_ns()}"
    main([f"model_name_or_path={model}", f"dataset=[{data}]", "finetuning_type=full", f"output_dir={out}", f"max_length={MAX_LENGTH}",
          f"per_device_train_batch_size={BATCH}", "gradient_accumulation_steps=1", "num_train_epochs=1", "learning_rate=1e-5",
          "save_strategy=no", "report_to=none", "logging_steps=1", "seed=0", "use_cpu=true", "val_size=0"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": metrics[-1]["time"], "pairs": sum(1 for _ in data.open())}


def trl_side(work: Path, model_dir: Path, data: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from stages.common.backbone import load_tokenizer
    from stages.common.config import ModelArguments

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model_dir)))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    config = RewardConfig(output_dir=str(work / f"trl-rm-{time.time_ns()}"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                          num_train_epochs=1, learning_rate=1e-5, max_length=MAX_LENGTH, logging_steps=1, save_strategy="no",
                          report_to="none", use_cpu=True, bf16=False, seed=0, dataset_num_proc=1)
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    output = trainer.train()
    return {"seconds": output.metrics["train_runtime"], "pairs": len(rows)}


def main() -> None:
    args, work = start(__doc__)
    model, data = prepare(work)
    if ran_one_side(args, {"tristage": lambda: tristage_side(work, model, data), "trl": lambda: trl_side(work, model, data)}):
        return
    runs = interleaved("bench.rm_throughput", ["tristage", "trl"], work, args.repeats)
    pps = {side: [r["pairs"] / r["seconds"] for r in runs[side]] for side in runs}
    result = {"pairs_per_second": {side: spread(v) for side, v in pps.items()}, "tristage_over_trl": ratio(pps["tristage"], pps["trl"]),
              "runs": runs}
    write_result("rm_throughput", result)
    print_table("Reward model, pairs/s", [("pairs/s", f"{spread(pps['tristage'])['median']:.1f}", f"{spread(pps['trl'])['median']:.1f}",
                                          fmt_ratio(result["tristage_over_trl"]))], ("", "tristage", "TRL RewardTrainer", "tristage / TRL"))


if __name__ == "__main__":
    main()
