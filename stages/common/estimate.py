"""Per-GPU memory of a run from its config and the model's config.json alone, no weights:
``launch/run_stage.sh sft|rm|ppo --estimate``. The byte accounting is memory.py's; this file adds the stages up.

SFT and RM: one model's weights, gradients and optimizer states, plus a micro-batch's activations (with the other
gradient-checkpointing setting alongside), and the model states of full / LoRA / QLoRA under no DeepSpeed, ZeRO-2,
ZeRO-3 and ZeRO-3 with offload side by side. PPO: the four roles, separate or as the shared backbone (the other
mode alongside), plus the largest of generation (the KV cache and, under ZeRO-3, the actor gathered in full), a
no-grad scoring pass and a training micro-batch. A run fits when its peak is within ``USABLE_FRACTION`` of the
GPU (the CUDA context and allocator fragmentation take the rest).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .memory import (GIB, ModelShape, ZeroSettings, activation_bytes, frozen_role_bytes, kv_cache_bytes, loaded_weight_bytes,
                     model_state_bytes, one_model, trainable_parameters, weight_bytes)

USABLE_FRACTION = 0.9


def load_model_config(model_args):
    """The model's transformers config: a local model (or an adapter's base), else the recipe's shipped
    architecture_config, else the hub (config.json only)."""
    from transformers import AutoConfig

    from .loading import adapter_base_path
    from .errors import ConfigError

    path = model_args.model_name_or_path
    local, remote = [], []
    for source in (path, adapter_base_path(path) if path and Path(path).is_dir() else None):
        if source:
            (local if (Path(source) / "config.json").is_file() else remote if not Path(source).is_dir() else []).append(source)
    if model_args.architecture_config:
        if not Path(model_args.architecture_config).is_file():
            raise ConfigError(f"{model_args.architecture_config} does not exist", key="architecture_config")
        local.append(model_args.architecture_config)
    for source in local + [r for r in remote if not Path(r).exists()]:  # hub names last: only config.json is fetched
        try:
            return AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
        except (OSError, ValueError):
            continue
    raise ConfigError(f"no config.json for {path!r}: give a local model or architecture_config (a config.json)",
                      key="architecture_config")


# ------------------------------------------------------------------------------------------ a stage's estimate
@dataclass
class Estimate:
    stage: str
    gpus: int
    gpu_memory_gib: float
    zero: str
    rows: dict[str, float] = field(default_factory=dict)  # component -> bytes per GPU, summing to the peak
    notes: dict[str, float] = field(default_factory=dict)  # alternatives (bytes), not in the peak
    facts: dict = field(default_factory=dict)
    matrix: dict[str, dict[str, float]] = field(default_factory=dict)  # model states: fine-tuning type -> ZeRO choice -> bytes

    @property
    def peak(self) -> float:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.peak <= USABLE_FRACTION * self.gpu_memory_gib * GIB

    def to_dict(self) -> dict:
        gib = lambda d: {k: round(v / GIB, 3) for k, v in d.items()}
        return {"stage": self.stage, "gpus": self.gpus, "gpu_memory_gib": self.gpu_memory_gib, "zero": self.zero,
                "per_gpu_gib": gib(self.rows), "peak_gib": round(self.peak / GIB, 3), "fits": self.fits,
                "alternatives_gib": gib(self.notes), "model_states_gib": {k: gib(v) for k, v in self.matrix.items()}, **self.facts}


def estimate_training(stage: str, shape: ModelShape, backbone, train_args, seq_len: int, gpus: int, gpu_memory_gib: float,
                      eager_attention: bool = False, dpo_args=None) -> Estimate:
    """SFT (a causal LM), RM (a 1-wide head, chosen and rejected in one batch) or DPO (a causal LM, both sides of each
    pair in one batch, and for full/freeze a frozen reference unless its log-probs are precomputed; lora/qlora's
    reference is the policy with its adapter off: no second model)."""
    zero = ZeroSettings.from_train_args(train_args)
    lm_head = stage != "rm"
    micro = train_args.per_device_train_batch_size * (1 if stage == "sft" else 2)
    states = one_model(shape, backbone, gpus, zero, lm_head, weight_bytes(train_args))
    if stage == "dpo" and backbone.finetuning_type not in ("lora", "qlora") and not getattr(dpo_args, "precompute_ref_log_probs", False):
        states["reference"] = frozen_role_bytes(shape, backbone, gpus, zero, True, weight_bytes(train_args))
    _, trained_layers = trainable_parameters(shape, backbone, lm_head)
    acts = {ckpt: activation_bytes(shape, seq_len, micro, ckpt, lm_head, eager_attention, trained_layers) for ckpt in (True, False)}
    checkpointing = bool(train_args.gradient_checkpointing)
    trained, _ = trainable_parameters(shape, backbone, lm_head)
    est = Estimate(stage, gpus, gpu_memory_gib, zero.describe(), facts={
        "parameters": shape.parameters(lm_head), "trainable_parameters": trained, "finetuning_type": backbone.finetuning_type,
        "micro_batch": micro, "sequence_length": seq_len, "gradient_checkpointing": checkpointing})
    est.rows = {**states, "activations": acts[checkpointing]}
    est.notes = {f"activations {'without' if checkpointing else 'with'} checkpointing": acts[not checkpointing]}
    est.matrix = model_state_matrix(shape, backbone, gpus, lm_head, weight_bytes(train_args))
    return est


def _as(backbone, finetuning_type: str):
    from dataclasses import replace

    return replace(backbone, finetuning_type=finetuning_type)


ZERO_CHOICES = {"no DeepSpeed": ZeroSettings(), "ZeRO-2": ZeroSettings(2), "ZeRO-3": ZeroSettings(3),
                "ZeRO-3 + offload": ZeroSettings(3, offload_optimizer=True, offload_params=True)}


def model_state_matrix(shape: ModelShape, backbone, gpus: int, lm_head: bool, frozen_bytes: int) -> dict[str, dict[str, float]]:
    """Model-state bytes per GPU of full / LoRA / QLoRA under each ZeRO choice: the savings side by side."""
    return {kind: {name: sum(one_model(shape, _as(backbone, kind), gpus, zero, lm_head, frozen_bytes).values())
                   for name, zero in ZERO_CHOICES.items()}
            for kind in ("full", "lora", "qlora")}


def vllm_engine_bytes(shape: ModelShape, rollout, train_args, gpu_memory_gib: float, seq: int) -> float:
    """A vLLM engine in each process (tensor parallel 1): its own whole copy of the weights in the compute dtype plus its
    KV cache (vllm_kv_cache_gb), or the share of the GPU vllm_gpu_memory_utilization gives it: at least the weights and
    one sequence's KV cache, which vLLM needs to start."""
    weights = weight_bytes(train_args) * shape.parameters(True)
    if rollout.vllm_kv_cache_gb:
        return weights + rollout.vllm_kv_cache_gb * GIB
    return max(rollout.vllm_gpu_memory_utilization * gpu_memory_gib * GIB, weights + kv_cache_bytes(shape, seq, 1))


def estimate_ppo(shape: ModelShape, reward_shape: ModelShape | None, backbone, ppo_args, sampling, train_args, gpus: int,
                 gpu_memory_gib: float, eager_attention: bool = False, rollout=None) -> Estimate:
    """The four roles: actor and critic train, reference and reward run forwards; separate models, or one shared
    base with four adapters (lora/qlora; an SFT adapter and an RM adapter assumed, as the pipeline makes them). Peak =
    all model states + the largest of generation (KV cache, and under ZeRO-3 the actor gathered in full), a no-grad
    scoring pass and a training micro-batch. Logits are kept for the response's positions only."""
    zero = ZeroSettings.from_train_args(train_args)
    reward_shape = reward_shape or shape
    micro, scoring_rows = train_args.per_device_train_batch_size, train_args.per_device_eval_batch_size
    seq, response = sampling.max_prompt_length + sampling.max_new_tokens, sampling.max_new_tokens + 1
    checkpointing = bool(train_args.gradient_checkpointing)
    adapters = backbone.finetuning_type in ("lora", "qlora")
    frozen_bytes = weight_bytes(train_args)
    reward_models = len(ppo_args.reward_models())

    def frozen(role_shape: ModelShape, lm_head: bool) -> float:
        """The reference (the SFT model) or a reward model: with adapters, the frozen base, the stage's adapter (peft
        keeps it float32) and a reward model's head copy (in the base's dtype)."""
        weights = frozen_role_bytes(role_shape, backbone, gpus, zero, lm_head, frozen_bytes)
        if adapters and zero.stage < 0:
            weights += 4.0 * role_shape.lora_parameters(backbone.lora_rank) + (0 if lm_head else frozen_bytes * role_shape.hidden)
        return weights

    def roles(shared: bool) -> dict[str, float]:
        if shared:  # one base (no DeepSpeed); adapters sft and reward frozen, ppo and critic trained, two 1-wide heads
            lora, heads = shape.lora_parameters(backbone.lora_rank), 2 * shape.hidden
            return {"shared base with the ppo adapter": loaded_weight_bytes(shape, backbone, frozen_bytes),
                    "sft, critic and reward adapters, heads": 4.0 * (3 * lora + heads),
                    "actor+critic gradients": 4.0 * (2 * lora + heads / 2), "actor+critic optimizer": 8.0 * (2 * lora + heads / 2)}
        actor = one_model(shape, backbone, gpus, zero, True, frozen_bytes)
        if adapters:  # the PPO adapter trains stacked on the frozen SFT adapter
            sft = shape.lora_parameters(backbone.lora_rank)
            actor["weights"] += 4.0 * sft if zero.stage < 0 else model_state_bytes(0, sft, 0, gpus, zero)["weights"]
        critic = one_model(reward_shape, backbone, gpus, zero, False, frozen_bytes)
        return {"actor weights": actor["weights"], "actor gradients": actor["gradients"], "actor optimizer": actor["optimizer"],
                "critic weights": critic["weights"], "critic gradients": critic["gradients"], "critic optimizer": critic["optimizer"],
                "reference": frozen(shape, True), "reward model": reward_models * frozen(reward_shape, False)}

    logit_bytes = 2 if frozen_bytes == 2 else 4  # under autocast the logits are 16-bit; a float32 copy is made one row at a time
    row = 2 * 4.0 * response * shape.vocab  # one row's float32 log-softmax and its gradient
    vllm = rollout is not None and rollout.rollout_engine == "vllm"
    generation = 0.0 if vllm else kv_cache_bytes(shape, seq, scoring_rows)  # hf: generation runs eval-batch rows at a time
    if zero.stage == 3 and not vllm:  # generation gathers the actor's shards once per rollout (vllm: one block at a time)
        generation += 2.0 * shape.parameters(True)
    scoring = scoring_rows * response * shape.vocab * logit_bytes + row + 2.0 * scoring_rows * seq * shape.hidden
    training, training_other = (max(activation_bytes(shape, seq, micro, ckpt, False, eager_attention)
                                    + micro * response * shape.vocab * logit_bytes + row,
                                    activation_bytes(reward_shape, seq, micro, ckpt, False, eager_attention))
                                for ckpt in (checkpointing, not checkpointing))
    shared = bool(ppo_args.shared_backbone)
    est = Estimate("ppo", gpus, gpu_memory_gib, zero.describe(), facts={
        "parameters": shape.parameters(True), "finetuning_type": backbone.finetuning_type, "shared_backbone": shared,
        "micro_batch": micro, "sequence_length": seq, "gradient_checkpointing": checkpointing})
    est.rows = {**roles(shared), "generation, scoring or training activations": max(generation, scoring, training)}
    if vllm:
        engine = vllm_engine_bytes(shape, rollout, train_args, gpu_memory_gib, seq)
        if rollout.vllm_enable_sleep_mode:  # asleep while scoring and training: the engine or the activations, not both
            est.rows["generation, scoring or training activations"] = max(engine, scoring, training)
        else:
            est.rows["vLLM engine (weights + KV cache)"] = engine
        est.facts["rollout_engine"] = "vllm (one engine per GPU, whole weights: models larger than one GPU need tensor parallelism)"
    other = roles(not shared) if adapters else None
    if other is not None:
        est.notes = {f"model states {'separate models' if shared else 'shared backbone (no DeepSpeed; data parallel on several GPUs)'}": sum(other.values())}
    est.notes.update({"generation (KV cache + gathered actor)": generation, "a scoring pass (logits)": scoring,
                      "training activations": training,
                      f"training activations {'without' if checkpointing else 'with'} checkpointing": training_other})
    return est


def estimate_stage(stage: str, configs: tuple, gpus: int, gpu_memory_gib: float) -> Estimate:
    """The estimate of a parsed stage config (as ``parse_config`` returns it for the stage)."""
    from .errors import ConfigError

    if stage not in ("sft", "rm", "ppo", "dpo"):
        raise ConfigError("--estimate applies to sft, rm, ppo and dpo", key="stage")
    model_args, data_args, backbone = configs[0], configs[1], configs[2]
    train_args = configs[-1]
    config = load_model_config(model_args)
    shape = ModelShape.from_config(config)
    # unset attention: transformers' sdpa, but eager for a checkpoint that soft-caps attention (backbone.attention_kwargs)
    eager = (model_args.attn_implementation or ("eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa")) == "eager"
    if stage == "ppo":
        from .generation import SamplingArguments

        sampling = next(c for c in configs if isinstance(c, SamplingArguments))
        from .rollout import RolloutArguments

        rollout = next((c for c in configs if isinstance(c, RolloutArguments)), None)
        return estimate_ppo(shape, None, backbone, configs[3], sampling, train_args, gpus, gpu_memory_gib, eager, rollout)
    return estimate_training(stage, shape, backbone, train_args, data_args.max_length, gpus, gpu_memory_gib, eager,
                             configs[3] if stage == "dpo" else None)


def print_estimate(est: Estimate) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{est.stage} on {est.gpus} x {est.gpu_memory_gib:g} GiB, {est.zero}")
    table.add_column("per GPU")
    table.add_column("GiB", justify="right")
    for name, value in est.rows.items():
        table.add_row(name, f"{value / GIB:.2f}")
    table.add_row("[bold]peak[/bold]", f"[bold]{est.peak / GIB:.2f}[/bold]")
    for name, value in est.notes.items():
        table.add_row(f"[dim]{name}[/dim]", f"[dim]{value / GIB:.2f}[/dim]")
    console = Console()
    console.print(table)
    if est.matrix:
        choices = Table(title="model states per GPU (GiB)")
        choices.add_column("")
        for name in ZERO_CHOICES:
            choices.add_column(name, justify="right")
        for kind, row in est.matrix.items():
            choices.add_row(kind, *(f"{row[name] / GIB:.2f}" for name in ZERO_CHOICES))
        console.print(choices)
    usable = USABLE_FRACTION * est.gpu_memory_gib
    if est.zero == "no DeepSpeed" and est.gpus > 1:
        console.print(f"{est.gpus} GPUs without DeepSpeed run data-parallel: every GPU holds all of the above, "
                      "and each trains on its share of every batch")
    verdict = "fits" if est.fits else "does NOT fit"
    console.print(f"{est.stage}: {verdict}: peak {est.peak / GIB:.1f} GiB of {usable:.1f} usable GiB per GPU "
                  f"({USABLE_FRACTION:.0%} of {est.gpu_memory_gib:g})")
