"""Reward models: the head, scoring, and the normalization statistics, used by the RM stage, PPO and eval.

A reward model is an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (the layout TRL and
OpenRLHF read), plain or with a peft adapter. ``RewardModel`` wraps it and reads the reward at the last
*attended* token from per-token scores, rather than relying on the HF pooling, which finds the last token
by looking for ``pad_token_id`` and so reads one token early when the pad token is also the EOS token
that ends every response. Any padding side works.

    tristage score --model runs/demo/rm --input responses.jsonl --output scored.jsonl [--normalize]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from stages.common.backbone import attention_kwargs, one_cpu_kernel
from stages.common.loading import trained_quantization
from stages.common.masks import last_token_index, position_ids_from_mask

STATS_FILE = "reward_stats.json"
SCORE_HEAD = ["score"]  # the name transformers gives the scalar head of *ForSequenceClassification decoders
# Used when a reward model does not record the max_length it was trained with (an exported or foreign model):
# long enough for typical chat exchanges, short enough for a 7B reward model's activations on one GPU.
DEFAULT_MAX_LENGTH = 1024
DEFAULT_BATCH_SIZE = 16  # (prompt, response) pairs per forward when a caller does not say


def score_head(model: nn.Module) -> nn.Module:
    return getattr(model, "score", None) or getattr(model, "classifier")


class RewardModel(nn.Module):
    """Per-sequence rewards from a sequence-classification model (plain or peft-wrapped)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.is_loaded_in_4bit = getattr(model, "is_loaded_in_4bit", False)
        self.is_loaded_in_8bit = getattr(model, "is_loaded_in_8bit", False)

    def _inner(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, length) scores of the head at every position (the critic in PPO uses all of them)."""
        inner = self._inner()
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        return score_head(inner)(hidden).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, all_tokens: bool = False) -> torch.Tensor:
        """The reward of each sequence; with ``all_tokens`` the head's score at every position (PPO's critic
        reads its values this way, through the same forward a DeepSpeed engine wraps)."""
        scores = self.token_scores(input_ids, attention_mask)
        if all_tokens:
            return scores
        return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

    def save_pretrained(self, directory, state_dict: dict | None = None, **kwargs) -> None:
        if state_dict is not None:  # a consolidated ZeRO-3 state dict carries this wrapper's "model." prefix
            state_dict = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state_dict.items()}
        self.model.save_pretrained(directory, state_dict=state_dict, **kwargs)


@dataclass
class RewardStats:
    """Mean and std of rewards on held-out responses, saved with the model; PPO normalizes with them."""

    mean: float
    std: float
    count: int

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        return (rewards - self.mean) / max(self.std, 1e-6)

    def save(self, directory) -> None:
        (Path(directory) / STATS_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory) -> "RewardStats | None":
        path = Path(directory) / STATS_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def load_reward_model(path: str, dtype: torch.dtype = torch.float32, base: str | None = None,
                      device: torch.device | None = None) -> RewardModel:
    """A full or exported reward model directory, or a peft adapter directory (its base from adapter_config,
    quantized as in training for QLoRA), with its weights in ``dtype`` on ``device``."""
    from transformers import AutoModelForSequenceClassification

    from stages.common.loading import placement

    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base_path = base or json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=dtype,
                                                                   quantization_config=trained_quantization(path), **placement(device),
                                                                   **attention_kwargs(base_path))
        one_cpu_kernel(model)  # score with the kernel training used
        model = PeftModel.from_pretrained(model, path)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype, **placement(device),
                                                                   **attention_kwargs(path))
    return RewardModel(model).eval()


def trained_max_length(path: str) -> int | None:
    """The ``max_length`` a reward model was trained with, from its tristage_config.yaml (None if it has none)."""
    import yaml

    config_file = Path(path) / "tristage_config.yaml"
    if not config_file.is_file():
        return None
    value = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("max_length")
    return int(value) if isinstance(value, int) else None


class RewardScorer:
    """Score (prompt, response) pairs as the RM stage trained on them: chat template, right padding,
    reward at the last real token, optionally normalized with the saved statistics. ``max_length`` None = the
    length the model was trained with (else DEFAULT_MAX_LENGTH)."""

    def __init__(self, path: str, normalize: bool = False, max_length: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 model: RewardModel | None = None, tokenizer=None, dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        from stages.common.backbone import load_tokenizer
        from stages.common.config import ModelArguments

        self.model = model or load_reward_model(path, dtype=dtype, device=device)
        self.tokenizer = tokenizer or load_tokenizer(ModelArguments(model_name_or_path=path))
        self.stats = RewardStats.load(path) if normalize else None
        if normalize and self.stats is None:
            raise FileNotFoundError(f"{path} has no {STATS_FILE}; train it with tristage rm or score without normalize")
        self.max_length = max_length or trained_max_length(path) or DEFAULT_MAX_LENGTH
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, prompts: list[list[dict] | str], responses: list[str]) -> list[float]:
        from stages.common.data import right_pad, tokenize_for_reward

        rewards: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(responses), self.batch_size):
            rows = [tokenize_for_reward(self.tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p, r,
                                        self.max_length)
                    for p, r in zip(prompts[start : start + self.batch_size], responses[start : start + self.batch_size])]
            input_ids, attention_mask = right_pad(rows, self.tokenizer.pad_token_id)
            batch = self.model(input_ids.to(device), attention_mask.to(device))
            if self.stats is not None:
                batch = self.stats.normalize(batch)
            rewards += batch.tolist()
        return rewards


def prompt_messages(record: dict) -> list[dict]:
    """A scoring record's prompt: ``prompt`` (string or messages) with an optional ``system``."""
    from stages.common.data import with_system

    prompt = record["prompt"]
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return with_system(messages, record.get("system") or None)


def main(argv=None) -> int:
    from stages.common.data import read_local_records
    from stages.common.errors import DataError
    from stages.common.loading import check_device_and_dtype, inference_device, inference_dtype

    parser = argparse.ArgumentParser(prog="tristage score", description="Add a 'reward' to each {prompt, response} record.")
    parser.add_argument("--model", required=True, help="reward model directory (full, exported, or adapter)")
    parser.add_argument("--input", required=True, help=".json/.jsonl records with prompt (string or messages), response, optional system")
    parser.add_argument("--output", required=True, help=".jsonl to write: the input records plus 'reward'")
    parser.add_argument("--normalize", action="store_true", help="(reward - mean) / std with the model's reward_stats.json")
    parser.add_argument("--max_length", type=int, default=None,
                        help=f"tokens per (prompt, response); default: the model's training max_length, else {DEFAULT_MAX_LENGTH}")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="pairs per forward")
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16")
    args = parser.parse_args(argv)
    check_device_and_dtype(args.device, args.dtype, "--device", "--dtype")
    device = inference_device(args.device)
    records = read_local_records(args.input)
    for number, record in enumerate(records, start=1):
        for key in ("prompt", "response"):
            if not isinstance(record, dict) or key not in record:
                raise DataError(args.input, "missing", record=number, field=key)
    scorer = RewardScorer(args.model, normalize=args.normalize, max_length=args.max_length, batch_size=args.batch_size,
                          dtype=inference_dtype(args.dtype, device), device=device)
    rewards = scorer.score([prompt_messages(r) for r in records], [r["response"] for r in records])
    with open(args.output, "w", encoding="utf-8") as f:
        for record, reward in zip(records, rewards):
            f.write(json.dumps({**record, "reward": reward}, ensure_ascii=False) + "\n")
    print(f"[tristage] scored {len(records)} responses -> {args.output}")
    return 0
