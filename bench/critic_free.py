"""Critic-free estimators (advantage_estimator): tristage's rloo vs TRL's RLOOTrainer, and grpo vs gae (what the
critic costs), each side a fresh process, repeats interleaved.

    python -m bench.critic_free [--repeats 3]       # in an environment with vLLM, rloo with the vllm engine too

bench/ppo_throughput.py's setting on every side: a random 4-block Llama (d=256), the demo's 72 shop questions, 64
episodes per optimizer step, 48 new tokens at temperature 1, micro-batch 16 x 4 accumulation, one pass per rollout,
learning rate 1e-5, the rule reward (count of "e"), a KL penalty of 0.05 against the frozen reference.
- rloo (both sides): 16 prompts x 4 samples, the leave-one-out baseline, advantages not whitened, the KL in the
  reward. Where the two differ (same cost): tristage puts the KL on every token and clips per-token ratios; TRL
  subtracts the response's summed KL from its reward before the baseline and clips one ratio per sequence.
- gae: PPO with a critic (from the actor), 64 prompts x 1 sample; grpo: 16 prompts x 4, the KL a loss term (k3).
Episodes/s is steady state (the first update left out); memory is the process's peak RSS, runtime included."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fmt_ratio, interleaved, print_table, ran_one_side, ratio, spread, start, write_result
from bench.ppo_throughput import prepare, trl_side, tristage_side

GIB = 1024**3
SAMPLES = 4
ESTIMATORS = {"rloo": ("advantage_estimator=rloo",), "grpo": ("advantage_estimator=grpo", "kl_in=loss", "kl_estimator=k3"),
              "gae": ("critic_init=actor",)}


def side(work: Path, name: str) -> dict:
    model, prompts = prepare(work)
    if name == "trl-rloo":
        from bench.common import peak_rss_bytes

        return {**trl_side(work, model, prompts), "peak_rss_bytes": peak_rss_bytes()}
    estimator, _, engine = name.partition("-")
    return tristage_side(work, model, prompts, estimator=ESTIMATORS[estimator], samples_per_prompt=1 if estimator == "gae" else SAMPLES,
                         extra=[f"rollout_engine={engine or 'hf'}"])


def main() -> None:
    args, work = start(__doc__)
    sides = ["rloo", "trl-rloo", "grpo", "gae"] + (["rloo-vllm"] if importlib.util.find_spec("vllm") else [])
    if ran_one_side(args, {name: (lambda n=name: side(work, n)) for name in sides}):
        return
    runs = interleaved("bench.critic_free", sides, work, args.repeats)
    episodes = {name: [r["episodes_per_second"] for r in runs[name]] for name in sides}
    memory = {name: [r["peak_rss_bytes"] for r in runs[name]] for name in sides}
    result = {"goal": "rloo >= 1.0x TRL RLOO with hf generate, >= 2x with vllm",
              "episodes_per_second": {name: spread(values) for name, values in episodes.items()},
              "peak_rss_gib": {name: spread([b / GIB for b in values]) for name, values in memory.items()},
              "rloo_over_trl_rloo": ratio(episodes["rloo"], episodes["trl-rloo"]),
              "grpo_over_gae_episodes": ratio(episodes["grpo"], episodes["gae"]),
              "grpo_over_gae_peak_rss": ratio(memory["grpo"], memory["gae"]), "runs": runs}
    table = [("rloo vs TRL RLOOTrainer, episodes/s (hf generate)", f"{spread(episodes['rloo'])['median']:.1f}",
              f"{spread(episodes['trl-rloo'])['median']:.1f}", fmt_ratio(result["rloo_over_trl_rloo"]))]
    if "rloo-vllm" in episodes:
        result["rloo_vllm_over_trl_rloo"] = ratio(episodes["rloo-vllm"], episodes["trl-rloo"])
        table.append(("rloo (vllm engine) vs TRL RLOOTrainer, episodes/s", f"{spread(episodes['rloo-vllm'])['median']:.1f}",
                      f"{spread(episodes['trl-rloo'])['median']:.1f}", fmt_ratio(result["rloo_vllm_over_trl_rloo"])))
    table += [("grpo vs gae, episodes/s", f"{spread(episodes['grpo'])['median']:.1f}", f"{spread(episodes['gae'])['median']:.1f}",
               fmt_ratio(result["grpo_over_gae_episodes"])),
              ("grpo vs gae, peak RSS (GiB)", f"{spread(memory['grpo'])['median'] / GIB:.2f}", f"{spread(memory['gae'])['median'] / GIB:.2f}",
               fmt_ratio(result["grpo_over_gae_peak_rss"]))]
    write_result("critic_free", result)
    print_table("Critic-free estimators (CPU, 2 cores)", table, ("", "A", "B", "A / B"))


if __name__ == "__main__":
    main()
