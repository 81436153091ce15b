"""DPO throughput: tristage's DPO stage vs TRL's DPOTrainer used directly, same ~21M-parameter Llama (8 blocks,
d=512; full fine-tuning, the reference a frozen copy), 256 of the demo's preference pairs with the same chat
template, batch 8 pairs, max_length 512, sigmoid loss, beta 0.1, one epoch, fp32 on CPU, fused AdamW (TRL's
default) and no gradient checkpointing (TRL's DPOConfig turns it on by default; off on both sides, so both do the
same work); once with a reference forward per step and once with the reference's log-probs precomputed (both sides).
Pairs/s = pairs of the epoch / seconds of training including the precompute pass (tristage: the tracker's clock,
which starts before the pass; TRL: train_runtime plus the time of its pass, which runs in DPOTrainer's constructor,
before train_runtime's clock starts; datasets' cache is off so no run reuses an earlier run's pass)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fmt_ratio, interleaved, print_table, ran_one_side, ratio, spread, start, write_result
from bench.rm_throughput import prepare

BATCH, MAX_LENGTH, BETA = 8, 512, 0.1


def tristage_side(work: Path, model: Path, data: Path, precompute: bool) -> dict:
    from stages.dpo.train import main

    out = work / f"tristage-dpo-{time.time_ns()}"
    main([f"model_name_or_path={model}", f"dataset=[{data}]", "finetuning_type=full", f"output_dir={out}", f"max_length={MAX_LENGTH}",
          f"per_device_train_batch_size={BATCH}", f"per_device_eval_batch_size={BATCH}", "gradient_accumulation_steps=1",
          "num_train_epochs=1", "learning_rate=1e-6", f"beta={BETA}", f"precompute_ref_log_probs={str(precompute).lower()}",
          "optim=adamw_torch_fused", "gradient_checkpointing=false",
          "save_strategy=no", "report_to=none", "logging_steps=1", "seed=0", "use_cpu=true", "val_size=0"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": metrics[-1]["time"], "pairs": sum(1 for _ in data.open()), "first_loss": metrics[0]["loss"]}


def trl_side(work: Path, model_dir: Path, data: Path, precompute: bool) -> dict:
    import datasets
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    datasets.disable_caching()  # TRL caches precomputed log-probs by dataset fingerprint: each run computes its own
    precompute_seconds = [0.0]
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            precompute_seconds[0] += time.perf_counter() - started

    DPOTrainer._precompute_ref_logps = timed

    from stages.common.backbone import load_tokenizer
    from stages.common.config import ModelArguments

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model_dir)))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = DPOConfig(output_dir=str(work / f"trl-dpo-{time.time_ns()}"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                       num_train_epochs=1, learning_rate=1e-6, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH,
                       precompute_ref_log_probs=precompute, precompute_ref_batch_size=BATCH, logging_steps=1, save_strategy="no",
                       optim="adamw_torch_fused", gradient_checkpointing=False,
                       report_to="none", use_cpu=True, bf16=False, seed=0, dataset_num_proc=1)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    output = trainer.train()
    first_loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return {"seconds": output.metrics["train_runtime"] + precompute_seconds[0], "train_runtime": output.metrics["train_runtime"],
            "precompute_seconds": precompute_seconds[0], "pairs": len(rows), "first_loss": first_loss}


SIDES = {"tristage": (tristage_side, False), "trl": (trl_side, False),
         "tristage_precomputed": (tristage_side, True), "trl_precomputed": (trl_side, True)}


def main() -> None:
    args, work = start(__doc__)
    model, data = prepare(work)
    if ran_one_side(args, {side: (lambda f=f, p=p: f(work, model, data, p)) for side, (f, p) in SIDES.items()}):
        return
    runs = interleaved("bench.dpo_throughput", list(SIDES), work, args.repeats)
    pps = {side: [r["pairs"] / r["seconds"] for r in runs[side]] for side in runs}
    result = {"pairs_per_second": {side: spread(v) for side, v in pps.items()},
              "tristage_over_trl": ratio(pps["tristage"], pps["trl"]),
              "tristage_over_trl_precomputed": ratio(pps["tristage_precomputed"], pps["trl_precomputed"]),
              "precomputed_over_not_tristage": ratio(pps["tristage_precomputed"], pps["tristage"]), "runs": runs}
    write_result("dpo_throughput", result)
    print_table("DPO, pairs/s", [
        ("reference forward per step", f"{spread(pps['tristage'])['median']:.2f}", f"{spread(pps['trl'])['median']:.2f}",
         fmt_ratio(result["tristage_over_trl"])),
        ("reference log-probs precomputed", f"{spread(pps['tristage_precomputed'])['median']:.2f}",
         f"{spread(pps['trl_precomputed'])['median']:.2f}", fmt_ratio(result["tristage_over_trl_precomputed"]))],
        ("", "tristage", "TRL DPOTrainer", "tristage / TRL"))


if __name__ == "__main__":
    main()
