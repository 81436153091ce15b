"""The demo's whole pipeline with both stage-3 methods (`launch/run_stage.sh all --stages sft,rm,ppo,grpo,dpo,eval`, from
scratch into a fresh run directory): wall time per stage and in total, and the gold judge's win rates of PPO, GRPO and DPO
over SFT-only with their 95% CIs, over --repeats runs (each about 5 minutes on 2 cores)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, print_table, spread, start, write_result


def main() -> None:
    args, work = start(__doc__)
    runs, gold = [], []
    for _ in range(args.repeats):
        run_dir, summary = work / f"demo-all-{time.time_ns()}", work / f"demo-all-{time.time_ns()}.json"
        started = time.time()
        subprocess.run([str(ROOT / "launch" / "run_stage.sh"), "all", "--run-dir", str(run_dir), "--summary-json", str(summary),
                        "--stages", "sft,rm,ppo,grpo,dpo,eval"], cwd=ROOT, check=True, capture_output=True, env={**os.environ, "NUM_GPUS": "0"})
        stages = {row["stage"]: row["seconds"] for row in json.loads(summary.read_text())}
        runs.append({**stages, "total": time.time() - started})
        report = json.loads((run_dir / "eval" / "eval_report.json").read_text())
        gold.append({f"{row['a']}_over_{row['b']}": {"win_rate": row["win_rate"], "ci": row["ci"]}
                     for row in report["win_rates"] if row["judge"] == "rule:gold_judge"})
    result = {name: spread([r[name] for r in runs]) for name in runs[0]}
    result["runs"] = runs
    result["gold_win_rates"] = gold  # per run: e.g. ppo_over_sft, grpo_over_sft, dpo_over_sft, dpo_over_ppo
    write_result("demo_all", result)
    print_table("demo `all`, seconds per stage", [(name, f"{result[name]['median']:.0f}", f"{result[name]['min']:.0f}-{result[name]['max']:.0f}")
                                                  for name in runs[0]], ("stage", "median s", "range"))
    print_table("demo: gold judge win rates (95% CI)", [(pair, *(f"{100 * g[pair]['win_rate']:.1f}% [{100 * g[pair]['ci'][0]:.1f}, "
                                                                 f"{100 * g[pair]['ci'][1]:.1f}]" for g in gold)) for pair in gold[0]],
                ("pair", *(f"run {i + 1}" for i in range(len(gold)))))


if __name__ == "__main__":
    main()
