"""The README's benchmark table from bench/results/*.json (written by bench/run_all): prints it and writes
bench/results/README_table.md."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def r(x: dict, digits: int = 2) -> str:
    return f"{x['median']:.{digits}f}× ({x['min']:.{digits}f}–{x['max']:.{digits}f}, n={x['n']})"


def verdict(value: float, goal: float, at_least: bool) -> str:
    met = value >= goal if at_least else value <= goal
    return "met" if met else f"missed ({'≥' if at_least else '≤'} {goal})"


def rows() -> list[str]:
    out = ["| measure | tristage | peer / baseline | ratio (median, range, repeats) | goal |", "| --- | --- | --- | --- | --- |"]
    if (ppo := load("ppo_throughput")):
        eps, tps = ppo["episodes_per_second"], ppo["tokens_per_second"]
        out.append(f"| PPO episodes/s vs TRL RLOOTrainer | {eps['tristage']['median']:.1f} | {eps['trl_rloo']['median']:.1f} | "
                   f"{r(ppo['speedup_episodes'])} | ≥ 1.5×: {verdict(ppo['speedup_episodes']['median'], 1.5, True)} |")
        out.append(f"| PPO generated tokens/s vs TRL RLOOTrainer | {tps['tristage']['median']:.0f} | {tps['trl_rloo']['median']:.0f} | "
                   f"{r(ppo['speedup_tokens'])} | |")
        out.append(f"| PPO: generating 64 rows per call vs 16 (the change made here) | | | {r(ppo['generation_batch_64_vs_16'])} | |")
    if (mem := load("ppo_memory")):
        out.append(f"| PPO peak RSS, shared backbone vs 4 separate models ({mem['parameters'] / 1e6:.0f}M params), GiB | "
                   f"{mem['shared_gib']['median']:.2f} | {mem['separate_gib']['median']:.2f} | {r(mem['shared_over_separate'])} | "
                   f"≤ 0.35×: {verdict(mem['shared_over_separate']['median'], 0.35, False)} |")
        out.append(f"| the same, minus the runtime's own RSS ({mem['runtime_gib']['median']:.2f} GiB: imports, no model) | | | "
                   f"{r(mem['shared_over_separate_without_runtime'])} | |")
    if (sft := load("sft_throughput")):
        tps = sft["tokens_per_second"]
        out.append(f"| SFT real tokens/s vs TRL SFTTrainer (both padding) | {tps['tristage-padding']['median']:.0f} | {tps['trl']['median']:.0f} | "
                   f"{r(sft['tristage_over_trl'])} | |")
        out.append(f"| SFT packing vs padding, length-skewed data | {tps['tristage-packing']['median']:.0f} | {tps['tristage-padding']['median']:.0f} | "
                   f"{r(sft['packing_over_padding'])} | ≥ 1.5×: {verdict(sft['packing_over_padding']['median'], 1.5, True)} |")
        out.append(f"| SFT achieved FLOP/s vs fp32 matmul peak ({sft['parameters'] / 1e6:.0f}M params), GFLOP/s | "
                   f"{sft['achieved_flops']['median'] / 1e9:.1f} | {sft['matmul_peak_flops']['median'] / 1e9:.1f} | {r(sft['fraction_of_peak'])} | "
                   f"≥ 0.40: {verdict(sft['fraction_of_peak']['median'], 0.40, True)} |")
    if (rm := load("rm_throughput")):
        pps = rm["pairs_per_second"]
        out.append(f"| RM pairs/s vs TRL RewardTrainer | {pps['tristage']['median']:.1f} | {pps['trl']['median']:.1f} | {r(rm['tristage_over_trl'])} | |")
    if (dpo := load("dpo_throughput")):
        pps = dpo["pairs_per_second"]
        out.append(f"| DPO pairs/s vs TRL DPOTrainer, reference forward per step | {pps['tristage']['median']:.2f} | {pps['trl']['median']:.2f} | "
                   f"{r(dpo['tristage_over_trl'])} | ≥ 1.0×: {verdict(dpo['tristage_over_trl']['median'], 1.0, True)} |")
        out.append(f"| DPO pairs/s vs TRL DPOTrainer, reference log-probs precomputed | {pps['tristage_precomputed']['median']:.2f} | "
                   f"{pps['trl_precomputed']['median']:.2f} | {r(dpo['tristage_over_trl_precomputed'])} | "
                   f"≥ 1.0×: {verdict(dpo['tristage_over_trl_precomputed']['median'], 1.0, True)} |")
        out.append(f"| DPO: precomputed reference vs a reference forward per step (tristage) | | | {r(dpo['precomputed_over_not_tristage'])} | |")
    if (z3 := load("zero3_memory")):
        out.append(f"| ZeRO-3 params + optimizer states per rank, 2 processes vs 1, MiB | {z3['two_processes_largest_rank_mib']['median']:.0f} | "
                   f"{z3['one_process_mib']['median']:.0f} | {r(z3['two_over_one'], 3)} | ≤ 0.55×: {verdict(z3['two_over_one']['median'], 0.55, False)} |")
    if (engines := load("rollout_engines")):
        for key, entry in engines.items():
            if key.startswith("generation_"):
                dtype = key.rsplit("_", 1)[1]
                out.append(f"| generation tokens/s, vLLM vs hf engine ({entry['parameters'] / 1e6:.1f}M params, {dtype}) | "
                           f"{entry['vllm_tokens_per_second']['median']:.0f} | {entry['hf_tokens_per_second']['median']:.0f} | "
                           f"{r(entry['vllm_over_hf'])} | {'≥ 2× at ~30M: ' + verdict(entry['vllm_over_hf']['median'], 2.0, True) if entry['parameters'] > 2e7 and dtype == 'float32' else ''} |")
        ppo = engines["ppo"]
        eps = ppo["episodes_per_second"]
        out.append(f"| PPO episodes/s, rollout_engine vllm vs hf | {eps['vllm']['median']:.1f} | {eps['hf']['median']:.1f} | {r(ppo['vllm_over_hf'])} | |")
        out.append(f"| PPO episodes/s, rollout_engine vllm vs TRL RLOOTrainer | {eps['vllm']['median']:.1f} | {eps['trl']['median']:.1f} | "
                   f"{r(ppo['vllm_over_trl_rloo'])} | ≥ 1.5×: {verdict(ppo['vllm_over_trl_rloo']['median'], 1.5, True)} |")
    if (free := load("critic_free")):
        eps, rss = free["episodes_per_second"], free["peak_rss_gib"]
        out.append(f"| rloo episodes/s vs TRL RLOOTrainer (hf generate both) | {eps['rloo']['median']:.1f} | {eps['trl-rloo']['median']:.1f} | "
                   f"{r(free['rloo_over_trl_rloo'])} | ≥ 1.0×: {verdict(free['rloo_over_trl_rloo']['median'], 1.0, True)} |")
        if "rloo_vllm_over_trl_rloo" in free:
            out.append(f"| rloo episodes/s, rollout_engine vllm vs TRL RLOOTrainer | {eps['rloo-vllm']['median']:.1f} | "
                       f"{eps['trl-rloo']['median']:.1f} | {r(free['rloo_vllm_over_trl_rloo'])} | "
                       f"≥ 2×: {verdict(free['rloo_vllm_over_trl_rloo']['median'], 2.0, True)} |")
        out.append(f"| grpo vs gae (the critic's cost), episodes/s | {eps['grpo']['median']:.1f} | {eps['gae']['median']:.1f} | "
                   f"{r(free['grpo_over_gae_episodes'])} | |")
        out.append(f"| grpo vs gae, peak RSS (GiB) | {rss['grpo']['median']:.2f} | {rss['gae']['median']:.2f} | {r(free['grpo_over_gae_peak_rss'])} | |")
    if (demo := load("demo_all")):
        stages = ", ".join(f"{name} {demo[name]['median']:.0f} s" for name in ("sft", "rm", "ppo", "grpo", "dpo", "eval") if name in demo)
        out.append(f"| demo `all` wall time (n={demo['total']['n']}) | {stages}; total {demo['total']['median']:.0f} s | | | |")
        for run, rates in enumerate(demo.get("gold_win_rates", [])):
            for pair, row in rates.items():
                out.append(f"| demo gold win rate {pair.replace('_over_', ' over ')} (run {run + 1}) | {100 * row['win_rate']:.1f}% | | "
                           f"95% CI {100 * row['ci'][0]:.1f}–{100 * row['ci'][1]:.1f}% | |")
    return out


def main() -> None:
    table = "\n".join(rows()) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "README_table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
