"""Config files and overrides as written, before any typing: ``--config FILE`` and its ``base:`` chain, ``key=value``
and ``--key value`` overrides, and the tokens argparse reads. Kept free of transformers, so the launcher can read
the one or two keys it needs (``raw_value``) in a fraction of a second; ``config.py`` does the typed parsing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import ConfigError

DEFAULT_OUTPUT_DIR = "runs/out"  # the training stages' output_dir when none is given
DEFAULT_EVAL_OUTPUT_DIR = "runs/eval"


def yaml_to_tokens(values: dict[str, Any]) -> list[str]:
    tokens: list[str] = []
    for key, value in values.items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue  # argparse cannot take an empty list; the dataclass default is used
        tokens.append(f"--{key}")
        if isinstance(value, bool):
            tokens.append(str(value).lower())
        elif isinstance(value, (list, tuple)):
            tokens.extend(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)
        elif isinstance(value, dict):
            tokens.append(json.dumps(value))
        else:
            tokens.append(str(value))
    return tokens


def override_tokens(overrides: Sequence[str]) -> list[str]:
    """``key=value`` and ``--key value`` / ``--key=value`` forms; list values as ``key=[a,b]`` or ``--key a b``."""
    tokens: list[str] = []
    for item in overrides:
        if not item.startswith("-") and "=" in item:
            key, value = item.split("=", 1)
            tokens.append(f"--{key}")
            if value.startswith("[") and value.endswith("]"):
                tokens.extend(v.strip() for v in value[1:-1].split(",") if v.strip())
            else:
                tokens.append(value)
        else:
            tokens.append(item)
    return tokens


def split_config_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Pull ``--config FILE`` (or ``config=FILE``) out of argv; the rest are overrides."""
    argv = list(argv)
    config_file = None
    for i, item in enumerate(argv):
        if item == "--config" and i + 1 < len(argv):
            config_file = argv[i + 1]
            del argv[i : i + 2]
            break
        if item.startswith("--config=") or item.startswith("config="):
            config_file = item.split("=", 1)[1]
            del argv[i]
            break
    return config_file, argv


def load_yaml(config_file: str, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping, with its ``base:`` chain (if any) merged underneath it."""
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError("no such file", file=config_file)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"not valid YAML: {str(err).splitlines()[0]}", file=config_file) from None
    if not isinstance(values, dict):
        raise ConfigError("the top level must be a mapping of key: value", file=config_file)
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError("must be the path of another YAML config", key="base", file=config_file)
    base_path = (path.parent / base).resolve()
    if base_path in _seen + (path.resolve(),):
        raise ConfigError(f"the base chain loops back to {base_path}", key="base", file=config_file)
    if not base_path.is_file():
        raise ConfigError(f"{base_path} does not exist", key="base", file=config_file)
    return {**load_yaml(str(base_path), _seen + (path.resolve(),)), **values}


def raw_value(argv: Sequence[str], key: str, default: str | None = None) -> str | None:
    """``key`` as the stage will see it before typing: the last override that sets it, else the config file (with its
    ``base:`` chain), else ``default``. A broken config file raises ConfigError, as the stage would."""
    config_file, overrides = split_config_argv(argv)
    tokens = override_tokens(overrides)
    value = None
    for i, token in enumerate(tokens):
        if token == f"--{key}" and i + 1 < len(tokens):
            value = tokens[i + 1]
        elif token.startswith(f"--{key}="):
            value = token.split("=", 1)[1]
    if value is not None:
        return value
    values = load_yaml(config_file) if config_file else {}
    return str(values[key]) if values.get(key) is not None else default
