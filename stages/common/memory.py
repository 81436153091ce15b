"""The byte accounting behind ``--estimate``: a model's shape from its config.json, and what its weights,
gradients, optimizer states, activations and KV cache take per GPU.

Without DeepSpeed the weights are counted as stages/common/backbone.py loads them (``loaded_weight_bytes``; tested
equal to the bytes a loaded model holds): trained weights in float32, frozen ones in the compute dtype (bfloat16 or
float16 when the run uses it, else float32), QLoRA's block linears as bitsandbytes stores them — 4-bit with its
quantization constants, or 8-bit with per-row scales — and, when QLoRA trains, its other weights in float32 (peft's
prepare_model_for_kbit_training upcasts them). Under DeepSpeed, model states follow DeepSpeed's own accounting
(``estimate_zero2/3_model_states_mem_needs``), per trained parameter in mixed precision: 16-bit weights 2 B,
16-bit gradients 2 B, fp32 gradients 4 B, fp32 master weights 4 B, Adam moments 8 B. ZeRO-1 partitions the fp32
gradients and optimizer states over the GPUs, ZeRO-2 all gradients too (2 + 18/N B), ZeRO-3 everything (18/N B:
the 16-bit gradients are reduce-scattered out of buckets straight into the fp32 partition) plus the largest layer
gathered in full while it runs (4 B per parameter of it). Offloading the optimizer moves the fp32 states and
gradients to CPU memory; offloading parameters (ZeRO-3) moves the 16-bit weights too.

Activations (per micro-batch) for a Llama-style block, per token: the norm inputs and projection inputs (6h), k
and v (2·kv), the gated MLP's three intermediate tensors (3·I), and with eager attention the a·s score and
probability matrices; with gradient checkpointing only each block's input (h) is kept plus one block's full set
during its recomputation. The LM head adds its logits (and their float32 copy for the loss).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit blocksize and the double-quantization blocksize


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
    head_dim: int = 0  # 0: hidden // heads

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, layers=config.num_hidden_layers, intermediate=config.intermediate_size,
                   vocab=config.vocab_size, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

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

    def buffer_bytes(self) -> int:
        """The rotary embedding's inverse frequencies (and their original copy), float32."""
        return 2 * 4 * ((self.head_dim or self.hidden // self.heads) // 2)


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


def weight_bytes(train_args) -> int:
    """Bytes of a frozen weight: the compute dtype's (bfloat16 or float16 when the run uses one, else float32)."""
    return 2 if getattr(train_args, "bf16", False) or getattr(train_args, "fp16", False) else 4


def prompt_parameters(shape: ModelShape, backbone) -> int:
    """P-tuning's trained parameters as peft builds them: v2 a key and a value per virtual token and layer (or an
    embedding and a two-layer projection MLP); v1 an embedding and a three-layer MLP prompt encoder."""
    tokens, h = backbone.num_virtual_tokens, shape.hidden
    e = backbone.encoder_hidden_size or h
    prefix = shape.layers * 2 * h
    if backbone.ptuning_version == 2:
        return tokens * h + (h * e + e) + (e * prefix + prefix) if backbone.prefix_projection else tokens * prefix
    return tokens * h + (h * e + e) + (e * e + e) + (e * h + h)  # MLP encoder (an LSTM one is about as large)


def trainable_parameters(shape: ModelShape, backbone, lm_head: bool = True) -> tuple[int, int]:
    """(trained parameters, trained-layer count for activations) of one model under a fine-tuning type. A reward
    model's or critic's 1-wide head always trains (with adapters, as a trained copy beside the frozen original)."""
    kind, head = backbone.finetuning_type, 0 if lm_head else shape.hidden
    if kind == "full":
        return shape.parameters(lm_head), shape.layers
    if kind in ("lora", "qlora"):
        return shape.lora_parameters(backbone.lora_rank) + head, shape.layers
    if kind == "freeze":
        blocks = min(abs(backbone.freeze_trainable_layers), shape.layers)
        # the last N blocks only need activations from block L-N on; the first N need them all
        return blocks * shape.block_parameters() + head, (blocks if backbone.freeze_trainable_layers > 0 else shape.layers)
    if kind == "ptuning":
        return prompt_parameters(shape, backbone), shape.layers
    raise ValueError(kind)


def quantized_parameters(shape: ModelShape) -> int:
    """What bitsandbytes quantizes: the blocks' linear layers (embeddings, norms and heads stay as they are)."""
    return shape.layers * shape.block_linear_parameters()


def quantized_bytes(shape: ModelShape, backbone) -> float:
    """The blocks' linears as bitsandbytes holds them. 4-bit: half a byte per weight, a code table of 16, and an
    absmax per block of 64 (double quantization: one byte, plus per 256 blocks a float32 absmax, a 256-entry code
    table and an offset; without it: a float32). 8-bit: a byte per weight and a float32 scale per output row."""
    per_block = 0.0
    for fan_in, fan_out in shape.linear_shapes():
        n = fan_in * fan_out
        if backbone.quantization_bit == 8:
            per_block += n + 4 * fan_out
            continue
        blocks = math.ceil(n / NF4_BLOCK)
        constants = blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * 256 + 4 if backbone.double_quantization else 4 * blocks
        per_block += n / 2 + 4 * 16 + constants
    return shape.layers * per_block


def loaded_weight_bytes(shape: ModelShape, backbone, frozen_bytes: int, lm_head: bool = True, trained: bool = True) -> float:
    """Bytes one model holds once loaded without DeepSpeed — parameters, buffers and quantization constants — as
    stages/common/backbone.py (``trained``) or stages/common/loading.py (a frozen role) load it."""
    total, kind = shape.parameters(lm_head), backbone.finetuning_type
    if not trained:  # a frozen role: the compute dtype, or quantized like the policy it belongs to
        if kind == "qlora":
            return quantized_bytes(shape, backbone) + frozen_bytes * (total - quantized_parameters(shape)) + shape.buffer_bytes()
        return frozen_bytes * total + shape.buffer_bytes()
    trained_params, _ = trainable_parameters(shape, backbone, lm_head)
    if kind == "full":
        return 4.0 * total + shape.buffer_bytes()
    if kind == "freeze":  # the trained blocks (and head) in float32, the rest in the compute dtype
        return 4.0 * trained_params + frozen_bytes * (total - trained_params) + shape.buffer_bytes()
    if kind == "qlora":  # prepare_model_for_kbit_training keeps what is not quantized in float32
        base = quantized_bytes(shape, backbone) + 4.0 * (total - quantized_parameters(shape))
    else:  # lora, ptuning: the whole base frozen, the adapter or prompt besides it
        base = frozen_bytes * total
    return base + 4.0 * trained_params + shape.buffer_bytes()


def one_model(shape: ModelShape, backbone, gpus: int, zero: ZeroSettings, lm_head: bool, frozen_bytes: int) -> dict[str, float]:
    """Weights, gradients and optimizer states of one trained model (its frozen base included)."""
    trained, _ = trainable_parameters(shape, backbone, lm_head)
    if zero.stage < 0:  # our engine: float32 trained weights, their gradients and Adam's two moments
        return {"weights": loaded_weight_bytes(shape, backbone, frozen_bytes, lm_head), "gradients": 4.0 * trained,
                "optimizer": 8.0 * trained}
    total = shape.parameters(lm_head)
    frozen = total if backbone.finetuning_type in ("lora", "qlora", "ptuning") else total - trained  # adapters add to the base
    states = model_state_bytes(trained, 0, shape.largest_layer_parameters(), gpus, zero)
    if backbone.finetuning_type == "qlora":  # (a quantized base cannot be sharded: the matrix shows what it would be)
        quantized = quantized_parameters(shape)
        states["weights"] += model_state_bytes(0, quantized, 0, gpus, zero, quantized_bytes(shape, backbone) / quantized)["weights"]
        frozen -= quantized
    states["weights"] += model_state_bytes(0, frozen, 0, gpus, zero)["weights"]  # DeepSpeed holds frozen weights in 16-bit
    return states


def frozen_role_bytes(shape: ModelShape, backbone, gpus: int, zero: ZeroSettings, lm_head: bool, frozen_bytes: int) -> float:
    """A model that only runs forwards (PPO's reference and reward): as loaded, or partitioned under ZeRO-3."""
    if zero.stage < 0:
        return loaded_weight_bytes(shape, backbone, frozen_bytes, lm_head, trained=False)
    return frozen_model_bytes(shape.parameters(lm_head), shape.largest_layer_parameters(), gpus, zero)
