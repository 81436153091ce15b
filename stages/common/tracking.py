"""Run tracking for every stage: a rich progress bar and metric lines on the terminal (or, given ``columns``,
a live rich table with a row per logged step), metrics.jsonl (always), and TensorBoard when ``report_to``
includes it. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class RunTracker:
    TABLE_ROWS = 12  # the live table shows the newest rows; metrics.jsonl has them all

    def __init__(self, output_dir: str, report_to: list[str] | None, total_steps: int, enabled: bool, title: str,
                 columns: list[str] | None = None):
        self.enabled, self.columns, self.rows = enabled, columns, []
        self.live = None
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
        if columns and self.console.is_terminal:
            self.live = Live(Group(self._table(), self.progress), console=self.console, refresh_per_second=4)
            self.live.start()
        else:
            self.progress.start()

    def _table(self):
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ["step", *self.columns]:
            table.add_column(column, justify="right")
        for row in self.rows[-self.TABLE_ROWS:]:
            table.add_row(*row)
        return table

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
        if self.live is not None:
            self.rows.append([str(step), *(_format(metrics.get(c, "")) for c in self.columns)])
            self.live.update(Group(self._table(), self.progress))
            return
        line = "  ".join(f"{k}={_format(v)}" for k, v in metrics.items())
        self.console.print(f"step {step}: {line}", highlight=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
        elif self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
