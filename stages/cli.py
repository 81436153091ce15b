"""``tristage <command>``: the console entry point. Bad input (config or data) is one line on stderr and
exit code 2, before any training starts."""
from __future__ import annotations

import sys
from typing import Callable

from stages.common.errors import INPUT_ERROR_EXIT_CODE, MEMORY_KNOBS, RUN_ERROR_EXIT_CODE, InputError, RunError, is_out_of_memory

COMMANDS = {
    "sft": ("stages.sft.train", "stage 1: supervised fine-tuning"),
    "rm": ("stages.rm.train", "stage 2: reward model on preference pairs"),
    "ppo": ("stages.ppo.train", "stage 3: PPO rollouts with KL control against the reference"),
    "all": ("stages.pipeline", "sft -> rm -> ppo -> eval, each reading the previous stage's output"),
    "eval": ("stages.eval.compare", "compare models (SFT-only vs RLHF) on held-out prompts"),
    "collect": ("rewards.collect.cli", "human preference collection: web app, SQLite store, agreement, export"),
    "score": ("rewards.model", "score a file of (prompt, response) records with a reward model"),
    "reward-server": ("rewards.remote", "serve reward model(s) or rules over HTTP for PPO"),
    "export": ("stages.common.export", "merge an adapter into a standalone model"),
    "demo": ("stages.demo.build", "build the demo's base model and data (no download)"),
    "estimate": ("stages.common.estimate", "per-GPU memory of a stage's config from the model's config.json (no weights)"),
    "config-get": ("stages.cli", "print one key of a resolved config (used by launch/run_stage.sh)"),
}


def run_stage_main(entry: Callable, argv: list[str] | None = None) -> int:
    try:
        result = entry(argv)
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


def config_get(argv: list[str]) -> int:
    """``tristage config-get STAGE KEY[,KEY...] [--config FILE] [overrides]``: the values the stage would use
    (defaults included), one per line. Also validates the config, so the launcher fails fast on a bad one."""
    from stages.common.config import STAGE_CONFIGS, parse_config

    stage, keys, rest = argv[0], argv[1].split(","), argv[2:]
    configs = parse_config(rest, STAGE_CONFIGS[stage])
    for key in keys:
        owner = next((cfg for cfg in configs if hasattr(cfg, key)), None)
        print(getattr(owner, key) if owner is not None else None)  # a key this stage does not have (eval: deepspeed)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: tristage <command> [--config FILE] [key=value ...]\n\ncommands:")
        for name, (_module, help_text) in COMMANDS.items():
            print(f"  {name:<11} {help_text}")
        return 0 if argv and argv[0] in ("-h", "--help") else INPUT_ERROR_EXIT_CODE
    command, rest = argv[0], argv[1:]
    if command == "config-get":
        return run_stage_main(config_get, rest)
    import importlib

    module = importlib.import_module(COMMANDS[command][0])
    return run_stage_main(module.main, rest)


if __name__ == "__main__":
    raise SystemExit(main())
