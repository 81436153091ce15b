"""ZeRO-3 on 2 CPU processes (torchrun, gloo): parameter + optimizer-state bytes held per rank vs one process,
same ~21M-parameter Llama, same DeepSpeed ZeRO-3 config, after one optimizer step (so Adam's moments exist).
Counted from the tensors themselves: each rank's parameter shards (``ds_tensor``), its fp32 master partition
and the optimizer's state tensors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, fmt_ratio, interleaved, print_table, ratio, side_args, spread, start, write_result
from bench.sft_throughput import prepare as prepare_sft


def tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def held_bytes(engine) -> dict:
    """Parameter and optimizer-state bytes this rank holds."""
    import torch

    params = sum(tensor_bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else tensor_bytes(p) for p in engine.module.parameters())
    zero_optimizer = engine.optimizer
    seen, optimizer = set(), 0
    inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
    tensors = [t for state in inner.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    tensors += list(getattr(zero_optimizer, "fp32_partitioned_groups_flat", []))
    for t in tensors:
        if t.data_ptr() not in seen and t.numel() > 1:
            seen.add(t.data_ptr())
            optimizer += tensor_bytes(t)
    return {"parameter_bytes": params, "optimizer_bytes": optimizer}


def rank_side(model_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from stages.common.backbone import apply_backbone, load_pretrained
    from stages.common.config import parse_config
    from stages.registry import STAGE_CONFIGS
    from stages.common.distributed import init_distributed
    from stages.common.engine import TrainingEngine, resolve_deepspeed_config

    model_args, _data, backbone, train_args = parse_config(
        [f"model_name_or_path={model_dir}", "finetuning_type=full", "output_dir=/tmp/unused", "use_cpu=true", "report_to=none",
         f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}", "per_device_train_batch_size=2"], STAGE_CONFIGS["sft"])
    dist = init_distributed(uses_deepspeed=True)
    ds_config = resolve_deepspeed_config(train_args, dist)
    model = apply_backbone(load_pretrained(AutoModelForCausalLM, model_args, backbone, train_args), backbone, train_args)
    engine = TrainingEngine(model, train_args, 1, dist, ds_config)
    ids = torch.randint(3, 500, (2, 64))
    loss = engine.forward_model(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.optimizer_step()
    counts = held_bytes(engine.ds_engine)
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, counts)
    if dist.is_main:
        out.write_text(json.dumps({"world_size": dist.world_size, "per_rank": gathered}))


def main() -> None:
    parser = side_args(__doc__)
    parser.add_argument("--rank-side", action="store_true", help="internal: one rank's count")
    args, work = start(__doc__, parser)
    model, _ = prepare_sft(work)
    if args.rank_side:
        rank_side(model, Path(args.out))
        return
    if args.side:  # start 1 or 2 ranks with torchrun and hand back what they wrote
        nproc = {"one-process": "1", "two-processes": "2"}[args.side]
        port = str(29600 + os.getpid() % 300)
        subprocess.run(["torchrun", "--nproc_per_node", nproc, "--master_port", port, "-m", "bench.zero3_memory", "--rank-side",
                        "--work", str(work), "--out", args.out], cwd=ROOT, check=True, capture_output=True)
        return
    runs = interleaved("bench.zero3_memory", ["one-process", "two-processes"], work, args.repeats)
    total = lambda r: max(rank["parameter_bytes"] + rank["optimizer_bytes"] for rank in r["per_rank"])
    one, two = [total(r) for r in runs["one-process"]], [total(r) for r in runs["two-processes"]]
    result = {"one_process_mib": spread([b / 2**20 for b in one]), "two_processes_largest_rank_mib": spread([b / 2**20 for b in two]),
              "two_over_one": ratio(two, one), "goal": "<= 0.55x", "runs": runs}
    write_result("zero3_memory", result)
    print_table("ZeRO-3 parameter + optimizer-state bytes per rank", [
        ("MiB per rank", f"{result['one_process_mib']['median']:.1f}", f"{result['two_processes_largest_rank_mib']['median']:.1f}",
         fmt_ratio(result["two_over_one"], 3))], ("", "1 process", "2 processes (largest rank)", "2 / 1"))


if __name__ == "__main__":
    main()
