"""Process-group setup shared by the stages: torchrun/deepspeed launchers set RANK/WORLD_SIZE, and
DeepSpeed picks the backend (NCCL on GPUs, gloo on its CPU accelerator)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    use_cpu: bool = False  # TrainingArguments' use_cpu: the CPU even where there is a GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() and not self.use_cpu else torch.device("cpu")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(uses_deepspeed: bool = False, use_cpu: bool = False) -> DistInfo:
    """Join the process group the launcher describes. DeepSpeed needs one even for a single process;
    without launcher variables it would go looking for MPI, so we describe a one-process group. ``use_cpu``:
    stay on the CPU (DeepSpeed's CPU accelerator, gloo) where there are GPUs."""
    if use_cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    if uses_deepspeed and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and not use_cpu:
        torch.cuda.set_device(local_rank)
    if (world_size > 1 or uses_deepspeed) and not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, use_cpu=use_cpu)


def shutdown_distributed() -> None:
    """Leave the process group before the interpreter exits: a gloo group destroyed only by the exit itself can abort
    the process ("terminate called without an active exception", about one 2-process run in four here) after its
    work is done, and the launcher then reports the run failed."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


BACKEND_DEVICE = {"nccl": "cuda", "gloo": "cpu", "mpi": "cpu", "xccl": "xpu", "hccl": "npu"}  # a backend named alone


def collective_device_type(backend_config: str) -> str:
    """The device type our collectives use for a process group with this backend config (``"nccl"``, ``"cuda:nccl"``,
    ``"cpu:gloo,cuda:nccl"``): the CPU when the group has a CPU backend (no copy for a few floats), else the group's
    first device type. NCCL takes only CUDA tensors: a CPU tensor there fails with "No backend type associated
    with device type cpu"."""
    types = [part.split(":")[0] if ":" in part else BACKEND_DEVICE.get(part, part) for part in backend_config.split(",")]
    return "cpu" if "cpu" in types else types[0]


def collective_device() -> torch.device:
    """This process's device of the default process group's type (see collective_device_type)."""
    device_type = collective_device_type(dist.get_backend_config())
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (metrics, token counts), float64, on the process group's device."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    """The largest of a few floats over all ranks."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


def process_count() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


GRADIENT_BUCKET_ELEMENTS = 2**24  # 64 MB of float32 per all-reduce: few calls, a bounded extra buffer (DDP's idea)


def average_gradients(params: list[torch.Tensor]) -> None:
    """Data parallelism without DeepSpeed: every rank's gradients become their mean over the ranks (a parameter
    without a gradient counts as zeros, so every rank makes the same calls)."""
    if process_count() < 2:
        return
    world = process_count()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    start = 0
    while start < len(grads):
        stop, size = start, 0
        while stop < len(grads) and (size == 0 or size + grads[stop].numel() <= GRADIENT_BUCKET_ELEMENTS):
            size += grads[stop].numel()
            stop += 1
        bucket = torch.cat([g.reshape(-1) for g in grads[start:stop]]).to(collective_device())
        dist.all_reduce(bucket)
        bucket /= world
        offset = 0
        for g in grads[start:stop]:
            g.copy_(bucket[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        start = stop


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (to skip a step together)."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0
