"""Shared fixtures: one tiny Llama (4 blocks, d=64) and its byte-level tokenizer, built once per session
with no download, and a helper that runs a stage through launch/run_stage.sh as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TINY_SFT = FIXTURES / "sft_tiny.yaml"


def _fixture_text() -> list[str]:
    lines = []
    for path in FIXTURES.glob("*.json*"):
        lines.append(path.read_text(encoding="utf-8"))
    return lines


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from stages.demo.build import build_base_model
    from stages.demo.task import corpus_lines

    out = tmp_path_factory.mktemp("tiny") / "base"
    # d=64: bitsandbytes packs 4-bit weights for CPU inference in blocks of 64 and fails on narrower layers.
    return build_base_model(out, layers=4, hidden=64, heads=2, vocab_size=400, max_positions=512,
                            corpus=corpus_lines() + _fixture_text())


def run_stage(stage: str, *overrides: str, config: Path | None = TINY_SFT, env: dict | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    command = [str(ROOT / "launch" / "run_stage.sh"), stage]
    if config is not None:
        command += ["--config", str(config)]
    command += list(overrides)
    full_env = {**os.environ, "PYTHON": sys.executable, "NUM_GPUS": "0", **(env or {})}
    result = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return result


def run_in_process(stage: str, *overrides: str, config: Path | None = TINY_SFT) -> subprocess.CompletedProcess:
    """The same command as ``run_stage`` (``tristage <stage> ...``) in this test process, for tests that need no
    launcher behaviour: the interpreter's imports are already done, so a tiny run takes a second, not five."""
    import contextlib
    import io

    from stages.cli import main

    out, err = io.StringIO(), io.StringIO()
    command = [stage, *(["--config", str(config)] if config is not None else []), *overrides]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(command)
    return subprocess.CompletedProcess(["tristage", *command], code, out.getvalue(), err.getvalue())


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_nodes(stage: str, *overrides: str, config: Path | None = TINY_SFT, timeout: int = 900) -> list[subprocess.CompletedProcess]:
    """Two "nodes" on loopback: run_stage.sh twice with NNODES=2, NODE_RANK 0 and 1 and one process each, as a
    Slurm job would start it on two machines (torchrun's static rendezvous at MASTER_ADDR:MASTER_PORT)."""
    command = [str(ROOT / "launch" / "run_stage.sh"), stage, *(["--config", str(config)] if config else []), *overrides]
    port = str(free_port())
    nodes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHON": sys.executable, "NUM_GPUS": "0", "NPROC": "1", "NNODES": "2",
                                   "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for rank in (0, 1)]
    results = []
    for node in nodes:
        try:
            stdout, stderr = node.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return results


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT\n{result.stdout[-4000:]}\nSTDERR\n{result.stderr[-4000:]}"


@pytest.fixture(scope="session")
def keyword_policy(tmp_path_factory, tiny_model) -> Path:
    """The tiny model after 12 PPO iterations against rule:keyword:e with a small beta (tests/fixtures/ppo_tiny.yaml):
    a policy that clearly differs from its reference. Used by the PPO and the eval tests."""
    out = tmp_path_factory.mktemp("keyword_policy") / "ppo"
    assert_ok(run_stage("ppo", f"model_name_or_path={tiny_model}", f"output_dir={out}", "rollout_batch_size=32", "max_steps=12",
                        "init_kl_coef=0.01", config=FIXTURES / "ppo_tiny.yaml"))
    return out
