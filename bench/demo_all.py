"""The demo's whole pipeline (`launch/run_stage.sh all`, from scratch into a fresh run directory): wall time per
stage (sft, rm, ppo, eval) and in total, over --repeats runs (each about 4.5 minutes on 2 cores)."""
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
    runs = []
    for _ in range(args.repeats):
        run_dir, summary = work / f"demo-all-{time.time_ns()}", work / f"demo-all-{time.time_ns()}.json"
        started = time.time()
        subprocess.run([str(ROOT / "launch" / "run_stage.sh"), "all", "--run-dir", str(run_dir), "--summary-json", str(summary)],
                       cwd=ROOT, check=True, capture_output=True, env={**os.environ, "NUM_GPUS": "0"})
        stages = {row["stage"]: row["seconds"] for row in json.loads(summary.read_text())}
        runs.append({**stages, "total": time.time() - started})
    result = {name: spread([r[name] for r in runs]) for name in runs[0]}
    result["runs"] = runs
    write_result("demo_all", result)
    print_table("demo `all`, seconds per stage", [(name, f"{result[name]['median']:.0f}", f"{result[name]['min']:.0f}-{result[name]['max']:.0f}")
                                                  for name in runs[0]], ("stage", "median s", "range"))


if __name__ == "__main__":
    main()
