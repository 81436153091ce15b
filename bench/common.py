"""Shared pieces of the benchmarks: build a model once, run each side in a fresh process, interleave repeats,
summarize ratios with their spread, print a rich table and write JSON.

Each measured run is a subprocess (``python -m bench.<name> --side X --out result.json``) so neither side
inherits the other's allocator state or threads; repeats alternate sides (A B A B A B) so drift in the
machine's speed hits both."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def build_model(out: Path, *, layers: int, hidden: int, heads: int, vocab_size: int, max_positions: int = 512) -> Path:
    """A random Llama of the given shape with the demo's tokenizer (no download); reused when it exists."""
    if (out / "config.json").is_file():
        return out
    from stages.demo.build import build_base_model

    return build_base_model(out, layers=layers, hidden=hidden, heads=heads, vocab_size=vocab_size, max_positions=max_positions)


def parameter_count(model_dir: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def run_side(module: str, side: str, work: Path, *args: str, env: dict | None = None, launcher: list[str] | None = None) -> dict:
    """One measured run of one side in a fresh process; returns the JSON it wrote."""
    out = work / f"{side}-{time.time_ns()}.json"
    command = [*(launcher or [sys.executable]), "-m", module, "--side", side, "--work", str(work), "--out", str(out), *args]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{module} --side {side} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def interleaved(module: str, sides: list[str], work: Path, repeats: int, *args: str, **kwargs) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side in sides:
            runs[side].append(run_side(module, side, work, *args, **kwargs))
    return runs


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(numerators: list[float], denominators: list[float]) -> dict:
    """Per-repeat ratios (repeat i of one side over repeat i of the other: they ran back to back)."""
    return spread([a / b for a, b in zip(numerators, denominators)])


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def fmt_ratio(r: dict, digits: int = 2) -> str:
    return f"{r['median']:.{digits}f}x ({r['min']:.{digits}f}-{r['max']:.{digits}f}, n={r['n']})"


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


def side_args(description: str):
    """The argument parser every benchmark's side runner shares."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--side", default=None, help="run one side and write its JSON (internal)")
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def start(description: str, parser=None):
    """(arguments, work directory) of a benchmark's command line."""
    args = (parser or side_args(description)).parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    return args, work


def ran_one_side(args, sides: dict) -> bool:
    """In a side process (``--side NAME``): run that side, write its JSON, and say so."""
    if not args.side:
        return False
    Path(args.out).write_text(json.dumps(sides[args.side]()))
    return True
