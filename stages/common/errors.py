"""Errors for bad user input: reported as one line with exit code 2, before any training starts."""
from __future__ import annotations

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
