"""Errors and exit codes: bad user input is one line and exit code 2, before any training starts; a run that
cannot go on is one line and exit code 3 (``run_stage_main`` maps them)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

INPUT_ERROR_EXIT_CODE = 2


class InputError(Exception):
    """A problem with what the user gave us (config or data), not a bug in tristage."""


class ConfigError(InputError):
    def __init__(self, message: str, key: str | None = None, file: str | None = None):
        where = ", ".join(part for part in (f"config {file}" if file else "", f"key '{key}'" if key else "") if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.key = key


class RecordError(ValueError):
    """Raised by a format parser for one record; the loader adds file and record number."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class DataError(InputError):
    def __init__(self, file: str, message: str, record: int | None = None, field: str | None = None):
        parts = [str(file)]
        if record is not None:
            parts.append(f"record {record}")
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(": ".join(parts) + f": {message}")
        self.file, self.record, self.field = file, record, field


STAGE_OUTPUTS = ("sft", "rm", "ppo", "dpo")  # a path ending in one of these is, by convention, that stage's output_dir


def looks_local(name: str) -> bool:
    """A local path rather than a hub name: absolute, relative with ./ ../ ~, deeper than the hub's namespace/name,
    or under a directory that exists here."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "./", "../", "~")) or len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def missing_path(name: str | None, key: str) -> ConfigError | None:
    """A ConfigError for a local-looking path that does not exist, naming the stage that writes it; None otherwise."""
    if not name or not looks_local(name) or os.path.exists(os.path.expanduser(name)):
        return None
    stage = Path(name.rstrip("/")).name
    hint = f"it is the {stage} stage's output: run launch/run_stage.sh {stage} first" if stage in STAGE_OUTPUTS else "check the path"
    return ConfigError(f"{name!r} does not exist ({hint})", key=key)


RUN_ERROR_EXIT_CODE = 3


class RunError(Exception):
    """A run that cannot go on (numbers blew up, the disk is full, memory ran out): one line, exit code 3, and
    whatever was saved before stays as it was."""


MEMORY_KNOBS = ("per_device_train_batch_size (with more gradient_accumulation_steps), max_length, gradient_checkpointing: true, "
                "finetuning_type: lora or qlora, deepspeed: configs/deepspeed/zero3.json or zero3_offload.json; PPO also "
                "per_device_eval_batch_size, max_new_tokens and shared_backbone: true")


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def run_stage_main(entry: Callable, argv: list[str] | None = None) -> int:
    """Run a command's ``main`` and turn our errors into one line on stderr and their exit code."""
    from .distributed import shutdown_distributed

    try:
        result = entry(argv)
        shutdown_distributed()
    except InputError as err:
        print(f"tristage: error: {err}", file=sys.stderr)
        return INPUT_ERROR_EXIT_CODE
    except RunError as err:
        print(f"tristage: error: {err}", file=sys.stderr)
        return RUN_ERROR_EXIT_CODE
    except Exception as err:  # noqa: BLE001 - only out-of-memory is turned into advice; anything else propagates
        if not is_out_of_memory(err):
            raise
        print(f"tristage: error: out of memory ({str(err).splitlines()[0][:200]}); reduce it with {MEMORY_KNOBS} "
              "(launch/run_stage.sh <stage> --estimate shows what each saves)", file=sys.stderr)
        return RUN_ERROR_EXIT_CODE
    return result if isinstance(result, int) else 0
