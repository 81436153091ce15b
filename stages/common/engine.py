"""One small training engine for every stage: plain torch on one process, or DeepSpeed (ZeRO-1/2/3,
offload) when ``deepspeed:`` names a config. The stage's loop calls the same four things either way:
``backward(loss)`` per micro-batch, ``optimizer_step()`` per accumulation window, ``save/load_checkpoint``,
and ``consolidated_state_dict()`` for the final model.

We drive DeepSpeed directly rather than through the HF Trainer because accelerate 1.15 sees a multi-process
CPU run as one process (it sets num_processes=1 without CUDA unless use_cpu is on); ``deepspeed.initialize``
works across processes on CPU (gloo) and GPU (NCCL) alike.
"""
from __future__ import annotations

import json
import random
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .distributed import DistInfo, average_gradients
from .errors import ConfigError
from .optimizers import BITSANDBYTES, build_optimizer, optimizer_name

_DS_CONFIG_REFERENCE = None  # keeps transformers' zero3 switch alive while models load (it is a weakref)


def _fill_auto(node: dict, key: str, value) -> None:
    if node.get(key) == "auto":
        node[key] = value


def resolve_deepspeed_config(train_args, dist: DistInfo) -> dict | None:
    """The DeepSpeed config with "auto" values filled from the training arguments (as the HF integration
    does, but with the real world size). Registers it with transformers so ZeRO-3 partitions at load."""
    global _DS_CONFIG_REFERENCE
    source = train_args.deepspeed
    if not source:
        return None
    if isinstance(source, dict):
        config = json.loads(json.dumps(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"no such file {source!r}", key="deepspeed")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}: broken JSON at line {err.lineno}: {err.msg}", key="deepspeed") from None
    if "optimizer" in config and optimizer_name(train_args) != "adamw_torch":
        raise ConfigError(f"the DeepSpeed config {source} has its own optimizer section; remove optim (or that section)", key="optim")
    if optimizer_name(train_args) in BITSANDBYTES:
        raise ConfigError("bitsandbytes' 8-bit and paged optimizers are for a single device (QLoRA); DeepSpeed partitions the "
                          "optimizer states itself: use adamw_torch", key="optim")
    micro, accumulation = train_args.per_device_train_batch_size, train_args.gradient_accumulation_steps
    _fill_auto(config, "train_micro_batch_size_per_gpu", micro)
    _fill_auto(config, "gradient_accumulation_steps", accumulation)
    _fill_auto(config, "train_batch_size", micro * accumulation * dist.world_size)
    _fill_auto(config, "gradient_clipping", train_args.max_grad_norm)
    for key, enabled in (("bf16", train_args.bf16), ("fp16", train_args.fp16)):
        if isinstance(config.get(key), dict):
            _fill_auto(config[key], "enabled", bool(enabled))
    optimizer = config.get("optimizer", {}).get("params", {})
    for key, value in (("lr", train_args.learning_rate), ("weight_decay", train_args.weight_decay),
                       ("betas", [train_args.adam_beta1, train_args.adam_beta2]), ("eps", train_args.adam_epsilon)):
        _fill_auto(optimizer, key, value)
    config.setdefault("steps_per_print", 10**9)  # our own logger reports progress
    if config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _DS_CONFIG_REFERENCE = HfDeepSpeedConfig(config)
    return config


MODEL_DEPENDENT_AUTO = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def fill_model_dependent_auto(config: dict, hidden_size: int | None) -> None:
    """ZeRO bucket sizes that depend on the model's width (DeepSpeed-recommended formulas, as in HF)."""
    zero = config.get("zero_optimization", {})
    if hidden_size is None:
        auto = [key for key in MODEL_DEPENDENT_AUTO if zero.get(key) == "auto"]
        if auto:
            raise ConfigError(f"the model's config has no hidden_size to derive zero_optimization.{auto[0]} from; "
                              f"set {', '.join(auto)} to numbers in the DeepSpeed config", key="deepspeed")
        return
    _fill_auto(zero, "reduce_bucket_size", hidden_size * hidden_size)
    _fill_auto(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    _fill_auto(zero, "stage3_param_persistence_threshold", 10 * hidden_size)


def build_scheduler(optimizer, train_args, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(train_args.lr_scheduler_type, optimizer, num_warmup_steps=train_args.get_warmup_steps(total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=train_args.lr_scheduler_kwargs or {})


class TrainingEngine:
    def __init__(self, model: nn.Module, train_args, total_steps: int, dist: DistInfo, ds_config: dict | None = None):
        self.args, self.dist, self.ds_config = train_args, dist, ds_config
        self.model = model
        self.ds_engine = None
        self.scaler = None
        if ds_config is None:  # one process, or data parallel: every rank holds the model, gradients are averaged
            if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
                model.to(dist.device)
            self.optimizer = build_optimizer(model, train_args)
            self.scheduler = build_scheduler(self.optimizer, train_args, total_steps)
            # fp16's narrow range underflows small gradients: scale the loss up, and the gradients back before clipping.
            # (bf16 has float32's range and needs none; DeepSpeed scales fp16 itself.)
            self.scaler = torch.amp.GradScaler(dist.device.type) if train_args.fp16 else None
        else:
            import deepspeed

            fill_model_dependent_auto(ds_config, getattr(model.config.get_text_config(), "hidden_size", None))
            optimizer = None if "optimizer" in ds_config else build_optimizer(model, train_args)
            scheduler = None
            if "scheduler" not in ds_config and optimizer is not None:
                scheduler = build_scheduler(optimizer, train_args, total_steps)
            self.ds_engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                model_parameters=[p for p in model.parameters() if p.requires_grad] if optimizer is None else None,
            )
        self.autocast_dtype = torch.bfloat16 if train_args.bf16 else (torch.float16 if train_args.fp16 else None)
        self.overflowed = False  # the last optimizer step was skipped by the fp16 loss scaler (not a NaN in the run)
        # how the weights are written (module, directory, state_dict or None); None = the module's save_pretrained.
        # A policy stacked on SFT adapters sets it, so checkpoints and the final model name their stack.
        self.save_weights: Callable[[nn.Module, Path, dict | None], None] | None = None

    # ---------------------------------------------------------------- forward / backward / step
    @property
    def module(self) -> nn.Module:
        """The bare model (for saving, generation and inspection)."""
        return self.ds_engine.module if self.ds_engine is not None else self.model

    @property
    def forward_model(self) -> nn.Module:
        """What training forwards go through: the DeepSpeed engine keeps per-micro-step ZeRO-3 state in its
        forward; calling the bare module under gradient accumulation loses all but one micro-batch's grads."""
        return self.ds_engine if self.ds_engine is not None else self.model

    @property
    def zero_stage(self) -> int:
        return self.ds_engine.zero_optimization_stage() if self.ds_engine is not None else 0

    def forward_context(self):
        if self.ds_engine is None and self.autocast_dtype is not None:
            return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)
        return nullcontext()

    def train(self, mode: bool = True) -> None:
        (self.ds_engine or self.model).train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` is already normalized over the whole accumulation window (sum / items in window)."""
        if self.ds_engine is not None:
            self.ds_engine.backward(loss, scale_wrt_gas=False)
            self.ds_engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def skip_backward(self) -> None:
        """Instead of ``backward`` for a micro-batch whose loss is not finite (every rank must agree to skip).
        The plain engine then drops the whole window's update; DeepSpeed gets an empty micro-step, so its
        accumulation count stays aligned and the other micro-batches of the window still count."""
        if self.ds_engine is not None:
            self.ds_engine.backward(torch.zeros((), requires_grad=True), scale_wrt_gas=False)
            self.ds_engine.step()
        else:
            self._skip_window = True

    def optimizer_step(self) -> float | None:
        """End of an accumulation window: clip, step, schedule, zero grads. Returns the gradient norm, or None
        when the update was skipped (a non-finite loss or gradient norm: the weights stay as they were)."""
        if self.ds_engine is not None:
            norm = self.ds_engine.get_global_grad_norm()
            return float(norm) if norm is not None else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        average_gradients(params)  # (several processes without DeepSpeed)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf"))
        skip = getattr(self, "_skip_window", False) or not torch.isfinite(norm)
        self.overflowed = self.scaler is not None and not torch.isfinite(norm)
        if self.scaler is not None:
            if not skip:
                self.scaler.step(self.optimizer)
            self.scaler.update()  # an overflow halves the scale, a run of good steps doubles it
        elif not skip:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._skip_window = False
        return None if skip else float(norm)

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---------------------------------------------------------------- checkpoints (for resume)
    def save_checkpoint(self, directory: Path, client_state: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():  # sampling and dropout on a GPU draw from the CUDA generators
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, directory / f"rng_rank{self.dist.rank}.pt")
        if self.ds_engine is not None:
            self.ds_engine.save_checkpoint(str(directory), tag="engine", client_state=client_state)
            return
        if not self.dist.is_main:  # data parallel: every rank holds the same weights and optimizer state
            return
        trainable = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save({"model": trainable, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "client_state": client_state}, directory / "engine.pt")

    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        if self.ds_engine is not None:
            _, client_state = self.ds_engine.load_checkpoint(str(directory), tag="engine")
        else:
            state = torch.load(directory / "engine.pt", weights_only=False)
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in state["model"].items():
                    params[name].copy_(value)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            client_state = state["client_state"]
        rng_file = directory / f"rng_rank{self.dist.rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        return client_state

    # ---------------------------------------------------------------- final weights
    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full state dict on rank 0 (gathered from the ZeRO-3 shards when sharded); None elsewhere."""
        if self.zero_stage == 3:
            return self.ds_engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict() if self.dist.is_main else None

    @contextmanager
    def generation_model(self):
        """The bare model ready for ``generate``. Under ZeRO-3 the shards are gathered once for the whole block
        and DeepSpeed's fetch/release hooks are taken off meanwhile (TRL's helpers), so generation neither
        all-gathers per token nor leaves the prefetcher with parameters in flight."""
        if self.zero_stage != 3:
            yield self.module
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            remove_hooks(self.ds_engine)
            try:
                yield self.module
            finally:
                add_hooks(self.ds_engine)

    def gatherer(self):
        """None, or (under ZeRO-3) a function making a list of parameters whole inside a block: what streams the
        weights to a rollout engine one block at a time."""
        if self.zero_stage != 3:
            return None
        import deepspeed

        return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    @contextmanager
    def gathered_parameters(self):
        """Every rank sees the full parameters inside this block (a no-op unless ZeRO-3)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield
        else:
            yield


def zero_stage(ds_config: dict | None) -> int:
    return (ds_config or {}).get("zero_optimization", {}).get("stage", 0)


def frozen_model(model: nn.Module, ds_config: dict | None, dist: DistInfo):
    """A model that only runs forwards (PPO's reference and reward models). Under ZeRO-3 it was partitioned
    while loading, so it runs inside a DeepSpeed engine without an optimizer (ZeRO inference); otherwise it
    is the plain model on this process's device."""
    model.requires_grad_(False)
    model.eval()
    if zero_stage(ds_config) == 3:
        import deepspeed

        config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        model.to(dist.device)
    return model
