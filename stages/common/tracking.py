"""Run tracking for every stage: a rich progress bar and table rows on the terminal, metrics.jsonl (always),
and TensorBoard when ``report_to`` includes it. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class RunTracker:
    def __init__(self, output_dir: str, report_to: list[str] | None, total_steps: int, enabled: bool, title: str):
        self.enabled = enabled
        self.console = Console(stderr=True, soft_wrap=True)
        self.metrics_path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        self.progress = None
        self.started = time.time()
        if not enabled:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if report_to and "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        self.progress = Progress(
            TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.task = self.progress.add_task(title, total=total_steps, status="")
        self.progress.start()

    def advance_to(self, step: int, status: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self.started, 3), **metrics}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        line = "  ".join(f"{k}={_format(v)}" for k, v in metrics.items())
        self.console.print(f"step {step}: {line}", highlight=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
