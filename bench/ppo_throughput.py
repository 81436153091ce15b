"""PPO episodes/s and generated tokens/s: tristage PPO vs TRL's RLOOTrainer (the nearest online-RL trainer
TRL 1.16 has; it trains no critic), same model, prompts, episodes per update, response length and micro-batch.

Both sides: a random 4-block Llama (d=256), the demo's 72 shop questions rendered with the same chat template,
64 episodes per optimizer step (tristage: 64 prompts x 1 sample; RLOO: 16 prompts x 4 samples, which its
leave-one-out baseline needs), 48 new tokens at temperature 1, micro-batch 16 x 4 accumulation, one pass per
rollout, a KL penalty against the frozen reference (beta 0.05), the same rule reward (count of "e").
Steady state: the first update is a warm-up and is left out; the rest are timed end to end."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, build_model, fmt_ratio, interleaved, print_table, ran_one_side, ratio, spread, start, write_result

EPISODES, NEW_TOKENS, MICRO, ACCUMULATION, ITERATIONS = 64, 48, 16, 4, 6


def prepare(work: Path) -> tuple[Path, Path]:
    import subprocess

    demo = work / "demo"
    if not (demo / "data" / "prompts_train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "stages.cli", "demo", "--out", str(demo)], cwd=ROOT, check=True, capture_output=True)
    model = build_model(work / "llama-d256", layers=4, hidden=256, heads=4, vocab_size=512)
    return model, demo / "data" / "prompts_train.jsonl"


def tristage_side(work: Path, model: Path, prompts: Path, generation_batch: int = EPISODES, extra: list[str] = (),
                  estimator: tuple[str, ...] = ("critic_init=actor",), samples_per_prompt: int = 1) -> dict:
    """Stage 3 with EPISODES rollouts per update: EPISODES / samples_per_prompt prompts, each sampled that often."""
    from bench.common import peak_rss_bytes
    from stages.ppo.train import main

    out = work / f"tristage-ppo-{time.time_ns()}"
    main([f"model_name_or_path={model}", f"dataset=[{prompts}]", "reward_model=[rule:keyword:e]", *estimator,
          f"samples_per_prompt={samples_per_prompt}", "finetuning_type=full", f"output_dir={out}",
          f"rollout_batch_size={EPISODES // samples_per_prompt}", "max_prompt_length=64",
          f"max_new_tokens={NEW_TOKENS}", "temperature=1.0", "init_kl_coef=0.05", "adaptive_kl=false", "ppo_epochs=1",
          f"per_device_train_batch_size={MICRO}", f"gradient_accumulation_steps={ACCUMULATION}", f"per_device_eval_batch_size={generation_batch}",
          "learning_rate=1e-5", "lr_scheduler_type=constant", f"max_steps={ITERATIONS}", "save_strategy=no", "report_to=none",
          "logging_steps=1", "seed=0", "use_cpu=true", *extra])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = metrics[-1]["time"] - metrics[0]["time"]  # "time" is elapsed since the start: iterations 2..N
    steady = metrics[1:]
    tokens = sum(m["response_length"] * EPISODES for m in steady)
    return {"episodes_per_second": EPISODES * len(steady) / seconds, "tokens_per_second": tokens / seconds,
            "rollout_share": sum(m["rollout_time"] for m in steady) / seconds,
            "update_share": sum(m["train_time"] for m in steady) / seconds, "peak_rss_bytes": peak_rss_bytes(),
            "final_score": metrics[-1]["score"], "final_kl": metrics[-1]["kl"]}


def trl_side(work: Path, model_dir: Path, prompts: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from rewards.rules import keyword_rule
    from stages.common.backbone import load_tokenizer
    from stages.common.config import ModelArguments

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model_dir)))
    tokenizer.padding_side = "left"
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["prompt"]}]}
                                 for r in rows])
    rule = keyword_rule("e")

    def reward(completions, **_):
        return [float(rule("", c[0]["content"] if isinstance(c, list) else c)) for c in completions]

    class Clock(TrainerCallback):
        stamps: list[float] = []
        tokens: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.tokens.append(logs["completions/mean_length"])

    config = RLOOConfig(output_dir=str(work / f"trl-rloo-{time.time_ns()}"), per_device_train_batch_size=MICRO,
                        gradient_accumulation_steps=ACCUMULATION, num_generations=4, max_completion_length=NEW_TOKENS,
                        temperature=1.0, beta=0.05, num_iterations=1, learning_rate=1e-5, lr_scheduler_type="constant",
                        max_steps=ITERATIONS, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                        seed=0, shuffle_dataset=True)
    clock = Clock()
    trainer = RLOOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=reward, args=config,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    seconds = clock.stamps[-1] - clock.stamps[0]
    steps = len(clock.stamps) - 1
    mean_length = sum(clock.tokens[1:]) / max(len(clock.tokens[1:]), 1)
    return {"episodes_per_second": EPISODES * steps / seconds, "tokens_per_second": EPISODES * steps * mean_length / seconds}


def main() -> None:
    args, work = start(__doc__)
    model, prompts = prepare(work)
    if ran_one_side(args, {"tristage": lambda: tristage_side(work, model, prompts), "trl": lambda: trl_side(work, model, prompts),
                           "tristage-generate-by-micro-batch": lambda: tristage_side(work, model, prompts, generation_batch=MICRO)}):
        return
    runs = interleaved("bench.ppo_throughput", ["tristage", "trl", "tristage-generate-by-micro-batch"], work, args.repeats)
    ours, theirs, before = runs["tristage"], runs["trl"], runs["tristage-generate-by-micro-batch"]
    result = {
        "episodes_per_second": {"tristage": spread([r["episodes_per_second"] for r in ours]),
                                "trl_rloo": spread([r["episodes_per_second"] for r in theirs])},
        "tokens_per_second": {"tristage": spread([r["tokens_per_second"] for r in ours]),
                              "trl_rloo": spread([r["tokens_per_second"] for r in theirs])},
        "speedup_episodes": ratio([r["episodes_per_second"] for r in ours], [r["episodes_per_second"] for r in theirs]),
        "speedup_tokens": ratio([r["tokens_per_second"] for r in ours], [r["tokens_per_second"] for r in theirs]),
        "tristage_rollout_share": spread([r["rollout_share"] for r in ours]),
        "tristage_update_share": spread([r["update_share"] for r in ours]),
        "generation_batch_64_vs_16": ratio([r["episodes_per_second"] for r in ours], [r["episodes_per_second"] for r in before]),
        "goal": ">= 1.5x", "runs": runs,
    }
    write_result("ppo_throughput", result)
    print_table("PPO throughput: tristage PPO vs TRL RLOOTrainer", [
        ("episodes/s", f"{result['episodes_per_second']['tristage']['median']:.1f}", f"{result['episodes_per_second']['trl_rloo']['median']:.1f}",
         fmt_ratio(result["speedup_episodes"])),
        ("tokens/s", f"{result['tokens_per_second']['tristage']['median']:.0f}", f"{result['tokens_per_second']['trl_rloo']['median']:.0f}",
         fmt_ratio(result["speedup_tokens"])),
        ("generating 64 rows per call vs 16 (tristage)", "", "", fmt_ratio(result["generation_batch_64_vs_16"]))],
        ("", "tristage", "TRL RLOO", "tristage / TRL"))


if __name__ == "__main__":
    main()
