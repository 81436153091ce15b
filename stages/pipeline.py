"""``launch/run_stage.sh all``: SFT -> RM -> PPO -> eval, each stage reading the previous one's output.

    launch/run_stage.sh all [--config-dir DIR] [--run-dir DIR] [--force] [--stages sft,rm,...] [overrides]

Each stage runs through ``launch/run_stage.sh`` (so it gets its launcher: torchrun, deepspeed, or a plain
process) with ``DIR/<stage>.yaml``. A stage whose finished output already exists (``trainer_state.json``, or
``eval_report.json`` for eval) is skipped unless ``--force``. Overrides: ``rm.learning_rate=1e-4`` goes to
one stage; an unprefixed ``seed=1`` goes to every stage that has the key.

``grpo`` is stage 3 again with ``DIR/grpo.yaml`` (a critic-free estimator), beside ``ppo``: ``--stages
sft,rm,grpo,eval`` trains it instead, ``--stages sft,rm,ppo,grpo,eval`` both. ``dpo`` (``DIR/dpo.yaml``) learns from
the preference pairs directly, with no reward model: ``--stages sft,dpo,eval``. Eval compares the models its config
lists, leaving out (with a line saying so) a policy output, or a reward-model judge, that this run neither trains
nor finds.

``--run-dir R`` puts every stage's output under R (R/sft, R/rm, R/ppo, R/eval) and rewrites the later
stages' references to the earlier outputs to match, so several runs (seeds, settings) of the same config
folder live side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from stages.common.config import load_yaml, parse_config
from stages.common.errors import ConfigError
from stages.common.rollout import RolloutArguments
from stages.common.rollout.vllm_engine import import_vllm
from stages.registry import STAGE_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ["sft", "rm", "ppo", "grpo", "dpo", "eval"]
DEFAULT_STAGES = ["sft", "rm", "ppo", "eval"]
RUNS_AS = {"grpo": "ppo"}  # a pipeline stage -> the stage command that runs it
POLICY_STAGES = ("ppo", "grpo", "dpo")  # what eval compares against SFT
FINISHED_MARKER = {"sft": "trainer_state.json", "rm": "trainer_state.json", "ppo": "trainer_state.json", "dpo": "trainer_state.json",
                   "eval": "eval_report.json"}


def runs_as(stage: str) -> str:
    return RUNS_AS.get(stage, stage)


def stage_keys(stage: str) -> set[str]:
    return {f.name for cls in STAGE_CONFIGS[runs_as(stage)] for f in dataclasses.fields(cls)}


def split_overrides(overrides: list[str], stages: list[str]) -> dict[str, list[str]]:
    """``stage.key=value`` to that stage; ``key=value`` to each stage that knows the key."""
    routed: dict[str, list[str]] = {s: [] for s in stages}
    for item in overrides:
        key, _, value = item.lstrip("-").partition("=")
        stage, dot, bare = key.partition(".")
        if dot and stage in PIPELINE:
            if stage in routed:
                routed[stage].append(f"{bare}={value}")
            continue
        takers = [s for s in stages if key in stage_keys(s)]
        if not takers:
            raise ConfigError(f"no stage of the pipeline has the key {key!r}", key=key)
        for s in takers:
            routed[s].append(f"{key}={value}")
    return routed


def relocate(values: dict, moves: dict[str, str]) -> dict:
    """Replace references to a moved output directory (exact, or as a path prefix) in string values."""
    def move(value):
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str):
            for old, new in moves.items():
                if value == old or value.startswith(old.rstrip("/") + "/"):
                    return new + value[len(old.rstrip("/")):]
        return value

    return {k: move(v) for k, v in values.items()}


def output_dir(stage: str, config_file: Path, overrides: list[str]) -> Path:
    configs = parse_config(["--config", str(config_file), *overrides], STAGE_CONFIGS[runs_as(stage)])
    return Path(next(c.output_dir for c in configs if hasattr(c, "output_dir")))


def finished(stage: str, out: Path) -> bool:
    return (out / FINISHED_MARKER[runs_as(stage)]).is_file()


def untrained_models(eval_file: Path, eval_overrides: list[str], missing_outputs: dict[str, Path]) -> list[str]:
    """Overrides that drop from eval's models and judges the stage outputs that will not exist (``missing_outputs``: each
    such stage's output directory), with a line naming each; none when everything will be there."""
    eval_args = next(c for c in parse_config(["--config", str(eval_file), *eval_overrides], STAGE_CONFIGS["eval"])
                     if hasattr(c, "models"))
    models = eval_args.models or []
    names = eval_args.model_names or [None] * len(models)
    missing = {out.resolve(): stage for stage, out in missing_outputs.items()}

    def gone(item: str, what: str) -> bool:
        if (stage := missing.get(Path(item).resolve())) is None:
            return False
        print(f"[tristage] all: eval leaves out the {what} {item}: {stage} has no finished run there and is not in --stages", flush=True)
        return True

    keep = [(m, n) for m, n in zip(models, names) if not gone(m, "model")]
    judges = [j for j in eval_args.judges if not gone(j, "judge")]
    overrides = [] if len(judges) == len(eval_args.judges) else [f"judges=[{','.join(judges)}]"]
    if len(keep) == len(models):
        return overrides
    overrides.append(f"models=[{','.join(m for m, _ in keep)}]")
    return overrides + ([f"model_names=[{','.join(n for _, n in keep)}]"] if eval_args.model_names else [])


def preflight(stage: str, config_file: Path, overrides: list[str]) -> None:
    """What a later stage would refuse for want of an install, refused before the first stage trains: a stage asking
    for the vLLM engine needs vllm importable (its model's architecture is checked when the stage starts)."""
    configs = parse_config(["--config", str(config_file), *overrides], STAGE_CONFIGS[runs_as(stage)])
    if any(isinstance(c, RolloutArguments) and c.rollout_engine == "vllm" for c in configs):
        import_vllm(key=f"{stage}.rollout_engine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_stage.sh all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-dir", default=str(ROOT / "configs" / "demo"), help="holds sft.yaml, rm.yaml, ppo.yaml, eval.yaml "
                                                                                     "(and grpo.yaml, dpo.yaml for those stages)")
    parser.add_argument("--run-dir", default=None, help="put every stage's output under this directory")
    parser.add_argument("--force", action="store_true", help="redo stages whose output already exists")
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES), help=f"a subset of {','.join(PIPELINE)}, run in that order")
    parser.add_argument("--summary-json", default=None, help="also write each stage's status and seconds to this file")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    asked = args.stages.split(",")
    if unknown := [s for s in asked if s not in PIPELINE]:
        raise ConfigError(f"{unknown[0]!r} is not one of {', '.join(PIPELINE)}", key="stages")
    stages = [s for s in PIPELINE if s in asked]
    config_dir = Path(args.config_dir)
    for stage in stages:
        if not (config_dir / f"{stage}.yaml").is_file():
            raise ConfigError(f"{config_dir / (stage + '.yaml')} does not exist", key="config-dir")
    routed = split_overrides(overrides, stages)

    config_files = {s: config_dir / f"{s}.yaml" for s in stages}
    if args.run_dir:
        run_dir = Path(args.run_dir)
        (run_dir / "configs").mkdir(parents=True, exist_ok=True)
        raw = {s: load_yaml(str(config_dir / f"{s}.yaml")) for s in PIPELINE if (config_dir / f"{s}.yaml").is_file()}
        moves = {values["output_dir"]: str(run_dir / s) for s, values in raw.items() if "output_dir" in values}
        for s in stages:
            config_files[s] = run_dir / "configs" / f"{s}.yaml"
            config_files[s].write_text(yaml.safe_dump(relocate(raw[s], moves), sort_keys=False, allow_unicode=True))

    if "eval" in stages:  # a policy (or reward-model judge) eval lists but nothing will have trained
        outputs = {s: Path(args.run_dir) / s if args.run_dir else output_dir(s, config_dir / f"{s}.yaml", [])
                   for s in ("rm", *POLICY_STAGES) if s not in stages and (config_dir / f"{s}.yaml").is_file()}
        routed["eval"] += untrained_models(config_files["eval"], routed["eval"],
                                           {s: out for s, out in outputs.items() if not finished(s, out)})
    for stage in stages:
        preflight(stage, config_files[stage], routed[stage])
    env = dict(os.environ)
    if config_dir.resolve() == (ROOT / "configs" / "demo").resolve():
        subprocess.run([str(ROOT / "launch" / "run_stage.sh"), "demo"], check=True, env=env)
    summary = []
    for stage in stages:
        out = output_dir(stage, config_files[stage], routed[stage])
        marker = out / FINISHED_MARKER[runs_as(stage)]
        if marker.is_file() and not args.force:
            print(f"[tristage] all: {stage} already finished in {out} (skipped; --force redoes it)", flush=True)
            summary.append((stage, out, "skipped", 0.0))
            continue
        if args.force and marker.is_file():
            marker.unlink()  # a later failure must not leave it looking finished
        print(f"[tristage] all: running {stage} -> {out}", flush=True)
        started = time.time()
        code = subprocess.run([str(ROOT / "launch" / "run_stage.sh"), runs_as(stage), "--config", str(config_files[stage]),
                               *routed[stage]], env=env).returncode
        summary.append((stage, out, "ran" if code == 0 else f"failed ({code})", time.time() - started))
        if code != 0:
            break
    print_summary(summary)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps([{"stage": st, "output": str(out), "status": status, "seconds": sec}
                                                       for st, out, status, sec in summary], indent=2))
    return 0 if all(status in ("ran", "skipped") for *_, status, _ in summary) else code


def print_summary(summary: list) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tristage all", header_style="bold")
    for column in ("stage", "output", "status", "time"):
        table.add_column(column)
    for stage, out, status, seconds in summary:
        table.add_row(stage, str(out), status, f"{seconds:.0f} s" if seconds else "")
    Console().print(table)
    for line in verdict({stage: out for stage, out, *_ in summary}):
        print(line)
    for stage, out, status, _ in summary:
        if stage == "eval" and (out / "eval_report.json").is_file():
            if status == "skipped":  # eval printed its tables when it ran; show them again
                import json

                from stages.eval.compare import print_report

                print_report(json.loads((out / "eval_report.json").read_text()))
            print(f"eval report: {out / 'eval_report.json'} (figure: {out / 'eval_report.png'})")


def verdict(outputs: dict[str, Path]) -> list[str]:
    """The numbers that say whether RLHF helped: the RM's held-out accuracy, PPO's final KL against its
    target, and the eval win rates of the last model over the first."""
    import json

    lines = []
    rm_state = outputs.get("rm", Path("/nonexistent")) / "trainer_state.json"
    if rm_state.is_file() and "eval_accuracy" in (state := json.loads(rm_state.read_text())):
        lines.append(f"reward model: {100 * state['eval_accuracy']:.1f}% agreement with the held-out preference labels")
    for stage in POLICY_STAGES:
        metrics = outputs.get(stage, Path("/nonexistent")) / "metrics.jsonl"
        if stage == "dpo" and metrics.is_file():
            last = [json.loads(line) for line in metrics.read_text().splitlines() if '"rewards/accuracies"' in line][-1]
            lines.append(f"dpo: final rewards/accuracies {last['rewards/accuracies']:.3f}, rewards/margins {last['rewards/margins']:.3f}")
        elif metrics.is_file():
            last = [json.loads(line) for line in metrics.read_text().splitlines() if '"kl"' in line][-1]
            config = yaml.safe_load((metrics.parent / "tristage_config.yaml").read_text())
            target = f"target {config['kl_target']}" if config.get("adaptive_kl") else f"fixed beta {config['init_kl_coef']}"
            lines.append(f"{stage} ({config.get('advantage_estimator', 'gae')}): final KL to the reference {last['kl']:.2f} nats "
                         f"per response ({target}), score {last['score']:.3f}")
    report = outputs.get("eval", Path("/nonexistent")) / "eval_report.json"
    if report.is_file():
        for row in json.loads(report.read_text())["win_rates"]:
            lines.append(f"eval: {row['a']} beats {row['b']} {100 * row['win_rate']:.1f}% of the time by {row['judge']} "
                         f"(95% CI {100 * row['ci'][0]:.1f}-{100 * row['ci'][1]:.1f}%)")
    return lines
