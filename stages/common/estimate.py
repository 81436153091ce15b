"""Per-GPU memory of a run from its config and the model's config.json alone, no weights:
``launch/run_stage.sh sft|rm|ppo --estimate``.

Model states follow DeepSpeed's own accounting (``estimate_zero2/3_model_states_mem_needs``), per trained
parameter in mixed precision: 16-bit weights 2 B, 16-bit gradients 2 B, fp32 gradients 4 B, fp32 master
weights 4 B, Adam moments 8 B. ZeRO-1 partitions the fp32 gradients and optimizer states over the GPUs,
ZeRO-2 all gradients too (2 + 18/N B), ZeRO-3 everything (18/N B: the 16-bit gradients are reduce-scattered
out of buckets straight into the fp32 partition) plus the largest layer gathered in full while it runs
(4 B per parameter of it). Offloading the optimizer moves the fp32 states and gradients to CPU memory;
offloading parameters (ZeRO-3) moves the 16-bit weights too. Without DeepSpeed our engine trains fp32
weights under autocast: 4 + 4 + 8 = 16 B per trained parameter. Frozen weights (LoRA's base, the PPO
reference and reward models) cost their storage only: 2 B in 16-bit, about 0.53 B as QLoRA's nf4 (0.5 B plus
double-quantized block constants) for the linear layers; ZeRO-3 partitions them as well.

Activations (16-bit, per micro-batch) for a Llama-style block, per token: the norm inputs and projection
inputs (6h), k and v (2·kv), the gated MLP's three intermediate tensors (3·I), and with eager attention the
a·s score and probability matrices; with gradient checkpointing only each block's input (h) is kept plus
one block's full set during its recomputation. The LM head adds 6 B per vocabulary entry per token (16-bit
logits and their fp32 copy for the loss). PPO adds the generation KV cache and, under ZeRO-3, the actor's
weights gathered in full for generation. A run fits when its peak is within ``USABLE_FRACTION`` of the GPU
(the CUDA context and allocator fragmentation take the rest).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1024**3
USABLE_FRACTION = 0.9
NF4_BYTES_PER_PARAM = 0.5 + 0.127 / 4  # 4 bits + ~0.127 bits of double-quantized constants per parameter (QLoRA paper)


# ------------------------------------------------------------------------------------------ the model's shape
@dataclass
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, layers=config.num_hidden_layers, intermediate=config.intermediate_size,
                   vocab=config.vocab_size, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one block: q, k, v, o, gate, up, down."""
        h, kv, inter = self.hidden, self.kv_width, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]

    def block_linear_parameters(self) -> int:
        return sum(i * o for i, o in self.linear_shapes())

    def block_parameters(self) -> int:
        return self.block_linear_parameters() + 2 * self.hidden  # two RMSNorm weights

    def parameters(self, lm_head: bool = True) -> int:
        """All parameters; lm_head=False for a reward model / critic (a 1-wide head instead of the LM head)."""
        embeddings = self.vocab * self.hidden * (2 if lm_head and not self.tied_embeddings else 1)
        return self.layers * self.block_parameters() + embeddings + self.hidden + (0 if lm_head else self.hidden)

    def largest_layer_parameters(self) -> int:
        """The largest module holding parameters directly (as DeepSpeed counts it): the embedding or a linear."""
        return max(self.vocab * self.hidden, max(i * o for i, o in self.linear_shapes()))

    def lora_parameters(self, rank: int) -> int:
        return self.layers * sum(rank * (i + o) for i, o in self.linear_shapes())


def load_model_config(model_args):
    """The model's transformers config: a local model (or an adapter's base), else the recipe's shipped
    architecture_config, else the hub (config.json only)."""
    from transformers import AutoConfig

    from .backbone import adapter_base_path
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


# ------------------------------------------------------------------------------------------ DeepSpeed settings
@dataclass
class ZeroSettings:
    stage: int = -1  # -1: no DeepSpeed
    offload_optimizer: bool = False
    offload_params: bool = False

    @classmethod
    def from_train_args(cls, train_args) -> "ZeroSettings":
        source = train_args.deepspeed
        if not source:
            return cls()
        config = source if isinstance(source, dict) else json.loads(Path(source).read_text(encoding="utf-8"))
        zero = config.get("zero_optimization", {})
        device = lambda key: (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")
        return cls(stage=int(zero.get("stage", 0)), offload_optimizer=device("offload_optimizer"), offload_params=device("offload_param"))

    def describe(self) -> str:
        if self.stage < 0:
            return "no DeepSpeed"
        offload = [name for name, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_params)) if on]
        return f"ZeRO-{self.stage}" + (f" + {' and '.join(offload)} offload" if offload else "")


# ------------------------------------------------------------------------------------------ model states
def model_state_bytes(trainable: int, frozen: int, largest_layer: int, gpus: int, zero: ZeroSettings,
                      frozen_bytes: float = 2.0) -> dict[str, float]:
    """Per-GPU bytes of one model: weights (trained in 16-bit + frozen), gradients, optimizer states."""
    if zero.stage < 0:  # our engine without DeepSpeed: fp32 weights under autocast
        return {"weights": 4.0 * trainable + frozen_bytes * frozen, "gradients": 4.0 * trainable, "optimizer": 8.0 * trainable}
    n, stage = gpus, zero.stage
    weights16 = 2.0 * trainable + frozen_bytes * frozen
    grads16, grads32, optimizer = 2.0 * trainable, 4.0 * trainable, 12.0 * trainable  # optimizer: fp32 master + Adam
    if stage >= 1:
        grads32, optimizer = grads32 / n, optimizer / n
    if stage >= 2:
        grads16 /= n
    if stage >= 3:
        weights16, grads16 = weights16 / n, 0.0
        weights16 += 4.0 * largest_layer if (trainable or frozen) else 0.0
    if zero.offload_optimizer and stage >= 1:
        grads32 = optimizer = 0.0
        if stage == 2:
            grads16 = 0.0
    if zero.offload_params and stage >= 3:
        weights16 = 4.0 * largest_layer
    return {"weights": weights16, "gradients": grads16 + grads32, "optimizer": optimizer}


def frozen_model_bytes(params: int, largest_layer: int, gpus: int, zero: ZeroSettings, frozen_bytes: float = 2.0) -> float:
    """A model that only runs forwards (PPO's reference and reward): its weights, partitioned under ZeRO-3."""
    return model_state_bytes(0, params, largest_layer, gpus, zero, frozen_bytes)["weights"]


# ------------------------------------------------------------------------------------------ activations
def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, checkpointing: bool, lm_head: bool = True,
                     eager_attention: bool = False, trained_layers: int | None = None) -> float:
    """16-bit activations kept for the backward pass of one micro-batch (see the module doc)."""
    tokens = seq_len * micro_batch
    per_token_layer = 6 * shape.hidden + 2 * shape.kv_width + 3 * shape.intermediate
    if eager_attention:
        per_token_layer += 2 * shape.heads * seq_len
    layer = 2.0 * tokens * per_token_layer
    layers = shape.layers if trained_layers is None else trained_layers
    blocks = layers * 2.0 * tokens * shape.hidden + layer if checkpointing else layers * layer
    return blocks + (6.0 * tokens * shape.vocab if lm_head else 0.0)


def kv_cache_bytes(shape: ModelShape, seq_len: int, batch: int) -> float:
    return 2.0 * 2 * shape.layers * shape.kv_width * seq_len * batch  # k and v, 16-bit


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


def trainable_parameters(shape: ModelShape, backbone, lm_head: bool = True) -> tuple[int, int]:
    """(trained, trained-layer count for activations) of one model under a fine-tuning type."""
    kind = backbone.finetuning_type
    if kind == "full":
        return shape.parameters(lm_head), shape.layers
    if kind in ("lora", "qlora"):
        return shape.lora_parameters(backbone.lora_rank), shape.layers
    if kind == "freeze":
        blocks = min(abs(backbone.freeze_trainable_layers), shape.layers)
        # the last N blocks only need activations from block L-N on; the first N need them all
        return blocks * shape.block_parameters(), (blocks if backbone.freeze_trainable_layers > 0 else shape.layers)
    if kind == "ptuning":  # v2: a key and a value per virtual token per layer; v1: embeddings + encoder (~ the same order)
        return backbone.num_virtual_tokens * shape.layers * 2 * shape.hidden, shape.layers
    raise ValueError(kind)


def frozen_bytes_per_param(backbone) -> float:
    return NF4_BYTES_PER_PARAM if backbone.finetuning_type == "qlora" and backbone.quantization_bit == 4 else \
        1.0 if backbone.finetuning_type == "qlora" else 2.0


def base_weight_bytes(shape: ModelShape, backbone, gpus: int, zero: ZeroSettings, lm_head: bool, frozen: int) -> float:
    """Per-GPU bytes of ``frozen`` parameters of the base; under QLoRA the block linears are 4-bit, the rest 16-bit."""
    if backbone.finetuning_type != "qlora":
        return model_state_bytes(0, frozen, 0, gpus, zero)["weights"]
    quantized = shape.layers * shape.block_linear_parameters()
    return model_state_bytes(0, quantized, 0, gpus, zero, frozen_bytes_per_param(backbone))["weights"] + \
        model_state_bytes(0, frozen - quantized, 0, gpus, zero)["weights"]


def _one_model(shape: ModelShape, backbone, gpus: int, zero: ZeroSettings, lm_head: bool) -> dict[str, float]:
    """Weights, gradients and optimizer states of one trained model (its frozen base included)."""
    total = shape.parameters(lm_head)
    trained, _ = trainable_parameters(shape, backbone, lm_head)
    frozen = total if backbone.finetuning_type in ("lora", "qlora", "ptuning") else total - trained  # adapters add to the base
    states = model_state_bytes(trained, 0, shape.largest_layer_parameters(), gpus, zero)
    states["weights"] += base_weight_bytes(shape, backbone, gpus, zero, lm_head, frozen)
    return states


def estimate_training(stage: str, shape: ModelShape, backbone, train_args, seq_len: int, gpus: int, gpu_memory_gib: float,
                      eager_attention: bool = False) -> Estimate:
    """SFT (a causal LM) or RM (a 1-wide head, chosen and rejected in one batch)."""
    zero = ZeroSettings.from_train_args(train_args)
    lm_head = stage == "sft"
    micro = train_args.per_device_train_batch_size * (1 if lm_head else 2)
    states = _one_model(shape, backbone, gpus, zero, lm_head)
    _, trained_layers = trainable_parameters(shape, backbone, lm_head)
    acts = {ckpt: activation_bytes(shape, seq_len, micro, ckpt, lm_head, eager_attention, trained_layers) for ckpt in (True, False)}
    checkpointing = bool(train_args.gradient_checkpointing)
    trained, _ = trainable_parameters(shape, backbone, lm_head)
    est = Estimate(stage, gpus, gpu_memory_gib, zero.describe(), facts={
        "parameters": shape.parameters(lm_head), "trainable_parameters": trained, "finetuning_type": backbone.finetuning_type,
        "micro_batch": micro, "sequence_length": seq_len, "gradient_checkpointing": checkpointing})
    est.rows = {**states, "activations": acts[checkpointing]}
    est.notes = {f"activations {'without' if checkpointing else 'with'} checkpointing": acts[not checkpointing]}
    est.matrix = model_state_matrix(shape, backbone, gpus, lm_head)
    return est


def _as(backbone, finetuning_type: str):
    from dataclasses import replace

    return replace(backbone, finetuning_type=finetuning_type)


ZERO_CHOICES = {"no DeepSpeed": ZeroSettings(), "ZeRO-2": ZeroSettings(2), "ZeRO-3": ZeroSettings(3),
                "ZeRO-3 + offload": ZeroSettings(3, offload_optimizer=True, offload_params=True)}


def model_state_matrix(shape: ModelShape, backbone, gpus: int, lm_head: bool) -> dict[str, dict[str, float]]:
    """Model-state bytes per GPU of full / LoRA / QLoRA under each ZeRO choice: the savings side by side."""
    return {kind: {name: sum(_one_model(shape, _as(backbone, kind), gpus, zero, lm_head).values()) for name, zero in ZERO_CHOICES.items()}
            for kind in ("full", "lora", "qlora")}


def estimate_ppo(shape: ModelShape, reward_shape: ModelShape | None, backbone, ppo_args, sampling, train_args, gpus: int,
                 gpu_memory_gib: float, eager_attention: bool = False) -> Estimate:
    """The four roles: actor and critic train, reference and reward run forwards; separate models, or one
    shared base with four adapters (lora/qlora). Peak = all model states + the larger of generation (KV cache,
    and under ZeRO-3 the actor gathered in full) and a training micro-batch."""
    zero = ZeroSettings.from_train_args(train_args)
    reward_shape = reward_shape or shape
    micro = train_args.per_device_train_batch_size
    seq = sampling.max_prompt_length + sampling.max_new_tokens
    checkpointing = bool(train_args.gradient_checkpointing)
    adapters = backbone.finetuning_type in ("lora", "qlora")

    def roles(shared: bool) -> dict[str, float]:
        zero_ = ZeroSettings() if shared else zero  # the shared backbone is a single-device mode, without DeepSpeed
        if shared:  # one base; adapters sft and reward frozen, ppo and critic trained (heads are tiny)
            lora = shape.lora_parameters(backbone.lora_rank)
            adapters_states = model_state_bytes(2 * lora, 2 * lora, shape.largest_layer_parameters(), 1, zero_)
            base = base_weight_bytes(shape, backbone, 1, zero_, True, shape.parameters(True))
            return {"shared base": base, "four adapters": adapters_states["weights"],
                    "actor+critic gradients": adapters_states["gradients"], "actor+critic optimizer": adapters_states["optimizer"]}
        actor = _one_model(shape, backbone, gpus, zero, lm_head=True)
        critic = _one_model(reward_shape, backbone, gpus, zero, lm_head=False)
        frozen_bytes = frozen_bytes_per_param(backbone)
        # an adapter policy's reference is its SFT model: the base with the SFT adapter merged in (16-bit, or 4-bit for qlora)
        reference = frozen_model_bytes(shape.parameters(True), shape.largest_layer_parameters(), gpus, zero,
                                       frozen_bytes if adapters else 2.0)
        reward = frozen_model_bytes(reward_shape.parameters(False), reward_shape.largest_layer_parameters(), gpus, zero,
                                    frozen_bytes if adapters else 2.0)
        return {"actor weights": actor["weights"], "actor gradients": actor["gradients"], "actor optimizer": actor["optimizer"],
                "critic weights": critic["weights"], "critic gradients": critic["gradients"], "critic optimizer": critic["optimizer"],
                "reference": reference, "reward model": reward}

    generation = kv_cache_bytes(shape, seq, train_args.per_device_eval_batch_size)  # generation runs eval-batch rows at a time
    if zero.stage == 3:  # generation gathers the actor's shards once per rollout
        generation += frozen_bytes_per_param(backbone) * shape.parameters(True) if adapters else 2.0 * shape.parameters(True)
    training, training_other = (max(activation_bytes(shape, seq, micro, ckpt, True, eager_attention),
                                    activation_bytes(reward_shape, seq, micro, ckpt, False, eager_attention))
                                for ckpt in (checkpointing, not checkpointing))
    shared = bool(ppo_args.shared_backbone)
    est = Estimate("ppo", gpus, gpu_memory_gib, zero.describe(), facts={
        "parameters": shape.parameters(True), "finetuning_type": backbone.finetuning_type, "shared_backbone": shared,
        "micro_batch": micro, "sequence_length": seq, "gradient_checkpointing": checkpointing})
    est.rows = {**roles(shared), "generation or training activations": max(generation, training)}
    other = roles(not shared) if adapters else None
    if other is not None:
        est.notes = {f"model states {'separate models' if shared else 'shared backbone (one GPU, no DeepSpeed)'}": sum(other.values())}
    est.notes.update({"generation (KV cache + gathered actor)": generation, "training activations": training,
                      f"training activations {'without' if checkpointing else 'with'} checkpointing": training_other})
    return est


def estimate_stage(stage: str, configs: tuple, gpus: int, gpu_memory_gib: float) -> Estimate:
    """The estimate of a parsed stage config (as ``parse_config`` returns it for the stage)."""
    from .errors import ConfigError

    if stage not in ("sft", "rm", "ppo"):
        raise ConfigError("--estimate applies to sft, rm and ppo", key="stage")
    model_args, data_args, backbone = configs[0], configs[1], configs[2]
    train_args = configs[-1]
    shape = ModelShape.from_config(load_model_config(model_args))
    eager = model_args.attn_implementation == "eager"
    if stage == "ppo":
        from .generation import SamplingArguments

        sampling = next(c for c in configs if isinstance(c, SamplingArguments))
        return estimate_ppo(shape, None, backbone, configs[3], sampling, train_args, gpus, gpu_memory_gib, eager)
    return estimate_training(stage, shape, backbone, train_args, data_args.max_length, gpus, gpu_memory_gib, eager)


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
    verdict = "fits" if est.fits else "does NOT fit"
    console.print(f"{est.stage}: {verdict}: peak {est.peak / GIB:.1f} GiB of {usable:.1f} usable GiB per GPU "
                  f"({USABLE_FRACTION:.0%} of {est.gpu_memory_gib:g})")
