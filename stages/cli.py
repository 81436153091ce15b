"""``tristage <command>``: the console entry point. Bad input (config or data) is one line on stderr and
exit code 2, before any training starts; a run that cannot go on is one line and exit code 3."""
from __future__ import annotations

import sys

from stages.common.errors import INPUT_ERROR_EXIT_CODE, run_stage_main

# command: (the module whose main(argv) runs it, what it does). A table: its rows share a shape by design, which is
# the one pair the duplicates tool reports in stages/.
COMMANDS = {
    "sft": ("stages.sft.train", "stage 1: supervised fine-tuning"),
    "rm": ("stages.rm.train", "stage 2: reward model on preference pairs"),
    "ppo": ("stages.ppo.train", "stage 3: PPO rollouts with KL control against the reference"),
    "dpo": ("stages.dpo.train", "DPO on preference pairs: no reward model, no rollouts"),
    "all": ("stages.pipeline", "sft -> rm -> ppo -> eval, each reading the previous stage's output"),
    "eval": ("stages.eval.compare", "compare models (SFT-only vs RLHF) on held-out prompts"),
    "collect": ("rewards.collect.cli", "human preference collection: web app, SQLite store, agreement, export"),
    "score": ("rewards.model", "score a file of (prompt, response) records with a reward model"),
    "reward-server": ("rewards.server", "serve reward model(s) or rules over HTTP for PPO"),
    "export": ("stages.common.export", "merge an adapter into a standalone model"),
    "demo": ("stages.demo.build", "build the demo's base model and data (no download)"),
    "estimate": ("stages.cli", "per-GPU memory of a stage's config from the model's config.json (no weights)"),
    "config-get": ("stages.cli", "print keys of a resolved config"),
    "launch-keys": ("stages.cli", "print a stage's output_dir and deepspeed config (used by launch/run_stage.sh)"),
}


def config_get(argv: list[str]) -> int:
    """``tristage config-get STAGE KEY[,KEY...] [--config FILE] [overrides]``: the values the stage would use
    (defaults included), one per line. Also validates the config, so the launcher fails fast on a bad one."""
    from stages.common.config import parse_config
    from stages.registry import STAGE_CONFIGS

    stage, keys, rest = argv[0], argv[1].split(","), argv[2:]
    configs = parse_config(rest, STAGE_CONFIGS[stage])
    for key in keys:
        owner = next((cfg for cfg in configs if hasattr(cfg, key)), None)
        print(getattr(owner, key) if owner is not None else None)  # a key this stage does not have (eval: deepspeed)
    return 0


def launch_keys(argv: list[str]) -> int:
    """``tristage launch-keys STAGE [--config FILE] [overrides]``: the stage's output_dir and deepspeed config, one per
    line, as the stage will read them, without typing the whole config (so the launcher starts in a fraction of a
    second; the stage itself still checks every key and refuses a bad config before any model loads)."""
    from stages.common.config_files import DEFAULT_EVAL_OUTPUT_DIR, DEFAULT_OUTPUT_DIR, raw_value

    stage, rest = argv[0], argv[1:]
    print(raw_value(rest, "output_dir", DEFAULT_EVAL_OUTPUT_DIR if stage == "eval" else DEFAULT_OUTPUT_DIR))
    print(raw_value(rest, "deepspeed") if stage != "eval" else None)
    return 0


def _gpu_defaults() -> tuple[int, float]:
    """GPUs per node and GiB per GPU from this machine when it has GPUs, else a typical 8 x 80 GiB node."""
    import torch

    from stages.common.memory import GIB

    if torch.cuda.is_available():
        return torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / GIB
    return 8, 80.0


def estimate(argv: list[str]) -> int:
    """``tristage estimate sft|rm|ppo|dpo [--gpus-per-node N] [--nodes N] [--gpu-memory GIB] [--json FILE] --config FILE [k=v ...]``
    (``launch/run_stage.sh STAGE --estimate`` passes NUM_GPUS, NNODES and GPU_MEMORY_GIB from the environment): per-GPU
    memory from the configs alone (stages/common/estimate.py). Exit code 0 when the run fits, 1 when it does not,
    2 for a bad config."""
    import argparse
    import json
    import os
    from pathlib import Path

    import torch

    from stages.common.config import parse_config
    from stages.common.errors import ConfigError
    from stages.common.estimate import estimate_stage, print_estimate
    from stages.registry import STAGE_CONFIGS

    gpus_default, memory_default = _gpu_defaults()
    parser = argparse.ArgumentParser(prog="tristage estimate")
    parser.add_argument("stage", choices=("sft", "rm", "ppo", "dpo"))
    parser.add_argument("--gpus-per-node", type=int, default=int(os.environ.get("NUM_GPUS") or 0) or gpus_default)
    parser.add_argument("--nodes", type=int, default=int(os.environ.get("NNODES") or 1))
    parser.add_argument("--gpu-memory", type=float, default=float(os.environ.get("GPU_MEMORY_GIB") or memory_default), help="GiB per GPU")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args, rest = parser.parse_known_args(argv)
    if args.gpus_per_node < 1 or args.nodes < 1 or args.gpu_memory <= 0:
        raise ConfigError("GPUs per node, nodes and GPU memory must be positive", key="estimate")
    if not torch.cuda.is_available():
        rest = [*rest, "use_cpu=true"]  # lets a bf16 recipe parse on a CPU login node; nothing runs
    configs = parse_config(rest, STAGE_CONFIGS[args.stage])
    est = estimate_stage(args.stage, configs, args.gpus_per_node * args.nodes, args.gpu_memory)
    print_estimate(est)
    if args.json:
        Path(args.json).write_text(json.dumps(est.to_dict(), indent=2))
    return 0 if est.fits else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: tristage <command> [--config FILE] [key=value ...]\n\ncommands:")
        for name, (_module, help_text) in COMMANDS.items():
            print(f"  {name:<13} {help_text}")
        return 0 if argv and argv[0] in ("-h", "--help") else INPUT_ERROR_EXIT_CODE
    command, rest = argv[0], argv[1:]
    if command == "config-get":
        return run_stage_main(config_get, rest)
    if command == "estimate":
        return run_stage_main(estimate, rest)
    if command == "launch-keys":
        return run_stage_main(launch_keys, rest)
    import importlib

    module = importlib.import_module(COMMANDS[command][0])
    return run_stage_main(module.main, rest)


if __name__ == "__main__":
    raise SystemExit(main())
