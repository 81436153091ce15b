"""Reading sources into parsed examples: local files (.json, .jsonl, .parquet, .csv) with exact record numbers,
``datasets.load_dataset`` names and directories, mixing by ratio, and the held-out split."""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, Iterable

from ..errors import DataError, RecordError
from .formats import FORMATS, as_prompt, detect_format, kinds_for

LOCAL_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")


def is_local_file(source: str) -> bool:
    """A file we read ourselves (for exact record numbers); directories and names go to datasets.load_dataset."""
    if os.path.isdir(os.path.expanduser(source)):
        return False
    return source.lower().endswith(LOCAL_EXTENSIONS) or source.startswith((".", "/", "~")) or os.path.exists(source)


def read_local_records(path: str) -> list[Any]:
    """Records of a local file; errors name the file and the line or record."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(path, "no such file")
    suffix = file.suffix.lower()
    if suffix in (".parquet", ".csv"):
        import datasets

        try:
            loaded = datasets.Dataset.from_parquet(str(file)) if suffix == ".parquet" else datasets.Dataset.from_csv(str(file))
        except Exception as err:  # the libraries raise many types; the user needs the file and the reason
            raise DataError(path, f"cannot read {suffix[1:]}: {str(err).splitlines()[0]}") from None
        return loaded.to_list()
    if suffix not in (".json", ".jsonl"):
        raise DataError(path, f"unknown file type {suffix!r} (expected one of {', '.join(LOCAL_EXTENSIONS)})")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = file.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(path, f"not UTF-8 text (bad byte at line {line})") from None
    if not text.strip():
        raise DataError(path, "is empty")
    if suffix == ".jsonl":
        records = []
        # "\n" (and "\r\n") only: str.splitlines would also break at U+2028, U+2029 and U+0085, which JSON strings may
        # hold unescaped (our own exports write them raw)
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(path, f"broken JSON on line {number}: {err.msg} (column {err.colno})", record=len(records) + 1) from None
        return records
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, f"broken JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("data"), list):
        loaded = loaded["data"]
    if not isinstance(loaded, list):
        raise DataError(path, "a .json data file must hold a list of records (or {\"data\": [...]})")
    return loaded


def read_records(source: str, split: str = "train") -> list[Any]:
    if is_local_file(source):
        return read_local_records(source)
    import datasets

    try:
        return datasets.load_dataset(source, split=split).to_list()
    except Exception as err:  # hub / loader errors: name the source
        raise DataError(source, f"cannot load with datasets.load_dataset (split {split!r}): {str(err).splitlines()[0]}") from None


def parse_records(source: str, records: list[Any], kind: str, format_name: str = "auto", skip_invalid: bool = False) -> list[Any]:
    """Parse and validate every record; raise on the first bad one, or drop bad ones with skip_invalid."""
    if not records:
        raise DataError(source, "holds no records")
    if format_name == "auto":
        if not isinstance(records[0], dict):
            raise DataError(source, f"must be an object of fields, got {type(records[0]).__name__}", record=1, field="<record>")
        fmt = detect_format(records[0], kind)
        if fmt is None:
            keys = sorted(records[0]) if isinstance(records[0], dict) else type(records[0]).__name__
            known = ", ".join(f.name for f in FORMATS.values() if f.kind in kinds_for(kind))
            raise DataError(source, f"unknown format: keys {keys} match none of the {kind} formats ({known})", record=1)
    else:
        fmt = FORMATS.get(format_name)
        if fmt is None or fmt.kind not in kinds_for(kind):
            known = ", ".join(f.name for f in FORMATS.values() if f.kind in kinds_for(kind))
            raise DataError(source, f"unknown {kind} format {format_name!r} (known: {known})")
    examples, skipped = [], 0
    for number, record in enumerate(records, start=1):
        try:
            if not isinstance(record, dict):
                raise RecordError("<record>", f"must be an object, got {type(record).__name__}")
            try:
                example = fmt.parse(record)
            except KeyError as missing:  # a later record lacks a key the file's format (from record 1) needs
                raise RecordError(str(missing.args[0]), f"missing (the file's records are {fmt.name})") from None
            if kind == "prompt":
                example = as_prompt(example)
        except RecordError as err:
            if skip_invalid:
                skipped += 1
                continue
            raise DataError(source, err.message, record=number, field=err.field) from None
        example.origin = (source, number)
        examples.append(example)
    if skipped:
        print(f"[tristage] {source}: skipped {skipped} invalid record(s) of {len(records)} (skip_invalid)")
    if not examples:
        raise DataError(source, f"no valid records left (skipped {skipped})")
    return examples


def mix_sources(per_source: list[list[Any]], ratios: list[float] | None, seed: int) -> list[Any]:
    """Concatenate, or draw from each source in proportion to its ratio.

    With ratios the mixture has as many examples as all sources together; source i contributes
    ``round(ratio_i / sum(ratios) * total)`` examples: a shuffled subset when it has more, whole repeats
    plus a shuffled remainder when it has fewer (upsampling).
    """
    if ratios is None:
        return [example for examples in per_source for example in examples]
    if len(ratios) != len(per_source):
        raise DataError("dataset_ratios", f"{len(ratios)} ratio(s) for {len(per_source)} dataset(s)")
    if any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError("dataset_ratios", "ratios must be non-negative and not all zero")
    rng = random.Random(seed)
    total = sum(len(examples) for examples in per_source)
    mixed = []
    for examples, ratio in zip(per_source, ratios):
        want = round(ratio / sum(ratios) * total)
        repeats, remainder = divmod(want, len(examples))
        shuffled = examples[:]
        rng.shuffle(shuffled)
        mixed += examples * repeats + shuffled[:remainder]
    rng.shuffle(mixed)
    return mixed


def split_eval(examples: list[Any], val_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    if val_size <= 0:
        return examples, []
    count = int(val_size) if val_size >= 1 else max(1, math.floor(len(examples) * val_size))
    if count >= len(examples):
        raise DataError("val_size", f"holds out {count} of {len(examples)} records, leaving none to train on")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def load_source_examples(sources: Iterable[str], kind: str, data_args) -> list[list[Any]]:
    """Parsed examples, one list per source."""
    return [
        parse_records(source, read_records(source, data_args.dataset_split), kind, data_args.format, data_args.skip_invalid)
        for source in sources
    ]

