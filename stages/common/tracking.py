"""Run tracking for every stage: a rich progress bar and metric lines on the terminal (or, given ``columns``,
a live rich table with a row per logged step), metrics.jsonl (always), and the trackers ``report_to`` names:
TensorBoard (``<output_dir>/tensorboard``), Weights & Biases (``project`` / ``run_name``; its own environment
variables apply: WANDB_MODE=offline, WANDB_DIR, ...) and MLflow (experiment ``project``, run ``run_name``; the
tracking URI from MLFLOW_TRACKING_URI). wandb and mlflow log the resolved config as the run's parameters. Only
rank 0 writes."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # report_to name -> the package it needs


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _numbers(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    def __init__(self, output_dir: str, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, output_dir: str, project: str, run_name: str | None, config: dict):
        import wandb

        self.run = wandb.init(project=project, name=run_name, dir=os.environ.get("WANDB_DIR", output_dir), config=config,
                              reinit="finish_previous")

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(_numbers(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    def __init__(self, output_dir: str, project: str, run_name: str | None, config: dict):
        import mlflow

        mlflow.set_experiment(project)
        self.mlflow, self.run = mlflow, mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})  # mlflow caps a parameter's length

    def log(self, step: int, metrics: dict) -> None:
        self.mlflow.log_metrics(_numbers(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}


class RunTracker:
    TABLE_ROWS = 12  # the live table shows the newest rows; metrics.jsonl has them all

    def __init__(self, output_dir: str, report_to: list[str] | None, total_steps: int, enabled: bool, title: str,
                 columns: list[str] | None = None, settings=None):
        """``settings``: the stage's TrainArguments, for run_name, project and disable_tqdm."""
        self.enabled, self.columns, self.rows = enabled, columns, []
        self.live = None
        self.console = Console(stderr=True, soft_wrap=True)
        self.metrics_path = Path(output_dir) / "metrics.jsonl"
        self.sinks = []
        self.progress = None
        self.started = time.time()
        if not enabled:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        config_file = Path(output_dir) / "tristage_config.yaml"
        config = _read_yaml(config_file) if config_file.is_file() else {}
        for name in report_to or []:
            self.sinks.append(SINKS[name](output_dir=str(output_dir), project=getattr(settings, "project", "tristage"),
                                          run_name=getattr(settings, "run_name", None), config=config))
        if getattr(settings, "disable_tqdm", False):
            return
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
        for sink in self.sinks:
            sink.log(step, metrics)
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
        for sink in self.sinks:
            sink.close()


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
