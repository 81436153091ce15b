"""The start every training stage shares: refuse impossible backbone settings, join the process group (DeepSpeed
needs one even for a single process), seed everything, and load the tokenizer — in that order, so a bad
setting fails before any process group or download."""
from __future__ import annotations

from transformers import set_seed

from .backbone import attention_kwargs, check_backbone_args, load_tokenizer
from .distributed import DistInfo, init_distributed
from .loop import find_checkpoint, refuse_model_only


def start_stage(stage: str, model_args, backbone_args, train_args, packing: bool = False) -> tuple[DistInfo, object]:
    """Returns (this process's place in the group, the tokenizer)."""
    check_backbone_args(backbone_args, train_args, stage=stage, packing=packing)
    if model_args.attn_implementation:  # an attention the checkpoint cannot run fails before the output directory exists
        try:
            attention_kwargs(model_args.model_name_or_path, model_args.attn_implementation, model_args.trust_remote_code)
        except OSError:
            pass  # no config to read yet: loading the model says so
    checkpoint = find_checkpoint(train_args)  # a checkpoint it cannot resume from fails now, not after loading
    if checkpoint is not None:
        refuse_model_only(checkpoint)
    dist = init_distributed(uses_deepspeed=bool(train_args.deepspeed) and not train_args.dry_run, use_cpu=train_args.use_cpu)
    set_seed(train_args.seed)
    return dist, load_tokenizer(model_args)
