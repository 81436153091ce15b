"""launch/run_stage.sh picks the launcher from the hardware and the environment: checked with --print-command
(what it would run), with fake nvidia-smi and scontrol on the PATH, so no GPU or cluster is needed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_SFT

ZERO3 = "deepspeed=configs/deepspeed/zero3.json"
CLEAN = ("NUM_GPUS", "NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE", "CUDA_VISIBLE_DEVICES",
         "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST")


@pytest.fixture(scope="module")
def fake_tools(tmp_path_factory):
    """nvidia-smi that lists 8 GPUs, and Slurm's scontrol that expands node[1-2] to node1, node2."""
    folder = tmp_path_factory.mktemp("bin")
    (folder / "nvidia-smi").write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(8)))
    (folder / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "node1\\nnode2\\n"\n')
    for tool in ("nvidia-smi", "scontrol"):
        (folder / tool).chmod(0o755)
    return folder


def command(*overrides: str, env: dict | None = None, path=None) -> str:
    base = {k: v for k, v in os.environ.items() if k not in CLEAN}
    base["PYTHON"] = sys.executable
    if path is not None:
        base["PATH"] = f"{path}:{base['PATH']}"
    result = subprocess.run([str(ROOT / "launch" / "run_stage.sh"), "sft", "--config", str(TINY_SFT), *overrides, "--print-command"],
                            cwd=ROOT, env={**base, **(env or {})}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert printed.endswith(f"sft --config {TINY_SFT}" + "".join(f" {o}" for o in overrides)), printed
    return printed[: printed.index(" --config ")]


def test_a_cpu_runs_one_plain_process_or_torchrun_for_several():
    assert command(env={"NUM_GPUS": "0"}) == f"{sys.executable} -m stages.cli sft"
    assert command(ZERO3, env={"NUM_GPUS": "0", "NPROC": "2"}) == (
        "torchrun --nproc_per_node 2 --nnodes 1 --node_rank 0 --master_addr 127.0.0.1 --master_port 29500 -m stages.cli sft")


def test_gpus_counted_by_nvidia_smi_get_the_deepspeed_launcher(fake_tools):
    assert command(ZERO3, path=fake_tools) == "deepspeed --no_local_rank --master_port 29500 --num_gpus 8 --module stages.cli sft"
    assert command(ZERO3, env={"NUM_GPUS": "4"}, path=fake_tools).endswith("--num_gpus 4 --module stages.cli sft")


def test_cuda_visible_devices_is_counted_and_passed_on(fake_tools):
    """A user limited to GPUs 4-7 gets 4-7: DeepSpeed's launcher would otherwise take 0-3 (or all 8)."""
    assert command(ZERO3, env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, path=fake_tools) == (
        "deepspeed --no_local_rank --master_port 29500 --include localhost:4,5,6,7 --module stages.cli sft")
    assert "--include localhost:4,5 " in command(ZERO3, env={"CUDA_VISIBLE_DEVICES": "4,5,6,7", "NPROC": "2"}, path=fake_tools)
    # GPU UUIDs cannot go to --include: torchrun keeps the variable as it is
    assert command(ZERO3, env={"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2"}, path=fake_tools).startswith("torchrun --nproc_per_node 2 ")
    assert command(ZERO3, env={"CUDA_VISIBLE_DEVICES": ""}, path=fake_tools) == f"{sys.executable} -m stages.cli sft"  # no GPU


def test_without_deepspeed_a_gpu_node_runs_data_parallel(fake_tools):
    """A QLoRA recipe (no DeepSpeed config) on an 8-GPU node: 8 processes, each with the whole (4-bit) model on its GPU,
    averaging their gradients (tests/test_data_parallel.py shows it equals one process on the same batch)."""
    assert command(env={}, path=fake_tools) == (
        "torchrun --nproc_per_node 8 --nnodes 1 --node_rank 0 --master_addr 127.0.0.1 --master_port 29500 -m stages.cli sft")
    assert command(env={"NPROC": "1"}, path=fake_tools) == f"{sys.executable} -m stages.cli sft"


def test_several_nodes_without_ssh_run_torchrun_on_each_node(fake_tools):
    """deepspeed --no_ssh with no hostfile cannot start ("Num nodes is >1 but no extra nodes available via hostfile")."""
    assert command(ZERO3, env={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node-1"}, path=fake_tools) == (
        "torchrun --nproc_per_node 8 --nnodes 2 --node_rank 1 --master_addr node-1 --master_port 29500 -m stages.cli sft")


def test_under_slurm_the_nodes_rank_and_master_come_from_slurm(fake_tools):
    slurm = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[1-2]", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert command(ZERO3, env=slurm, path=fake_tools) == (
        "torchrun --nproc_per_node 4 --nnodes 2 --node_rank 1 --master_addr node1 --master_port 29500 -m stages.cli sft")


def test_a_hostfile_gets_the_deepspeed_launcher_over_ssh(fake_tools):
    env = {"HOSTFILE": "launch/hostfile.example", "NNODES": "2", "MASTER_ADDR": "node-1"}
    assert command(ZERO3, env=env, path=fake_tools) == (
        "deepspeed --no_local_rank --hostfile launch/hostfile.example --num_nodes 2 --num_gpus 8 --master_addr node-1 "
        "--master_port 29500 --module stages.cli sft")
