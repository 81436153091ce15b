"""Batches: one padding helper for every stage, and the SFT and preference collators."""
from __future__ import annotations

from typing import Sequence

import torch

from .tokenize import IGNORE_INDEX


def pad_rows(rows: Sequence[Sequence[int] | torch.Tensor], value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one (len(rows), longest) long tensor filled with ``value`` on the ``side``
    ("right" or "left") they are short, and the mask that is 1 on their real entries. Tensor rows keep their device."""
    width = max(len(row) for row in rows)
    device = rows[0].device if isinstance(rows[0], torch.Tensor) else None
    padded = torch.full((len(rows), width), value, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        if len(row):
            columns = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            padded[i, columns] = torch.as_tensor(row, dtype=torch.long, device=device)
            mask[i, columns] = 1
    return padded, mask


def right_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows(sequences, pad_token_id, side="right")


def collate_sft(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Packed rows get position ids that restart per example and no attention mask,
    from which transformers builds a block-diagonal causal mask (no attention across examples)."""
    input_ids, attention_mask = pad_rows([r["input_ids"] for r in rows], pad_token_id)
    labels, _ = pad_rows([r["labels"] for r in rows], IGNORE_INDEX)
    if "seq_lengths" not in rows[0]:
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    width = input_ids.shape[1]
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        lengths = list(row["seq_lengths"]) + [width - len(row["input_ids"])]  # the padding is one more segment
        position_ids[i] = torch.cat([torch.arange(n) for n in lengths if n > 0])
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_preferences(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One forward for both sides: the first half of the batch is the chosen responses, the second the rejected."""
    input_ids, attention_mask = right_pad([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "margin": torch.tensor([float(r["margin"]) for r in rows]),
            "tie": torch.tensor([bool(r.get("tie", False)) for r in rows])}


def collate_dpo(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """collate_preferences' batch plus ``response_mask``: 1 on each side's response tokens (the tokens DPO's
    log-probabilities sum over), and the reference's precomputed log-probs when the rows carry them."""
    batch = collate_preferences(rows, pad_token_id)
    starts = [r["chosen_start"] for r in rows] + [r["rejected_start"] for r in rows]
    positions = torch.arange(batch["input_ids"].shape[1])[None, :]
    batch["response_mask"] = (positions >= torch.tensor(starts)[:, None]).long() * batch["attention_mask"]
    if all("ref_chosen_logp" in r for r in rows):
        batch["ref_logps"] = torch.tensor([r["ref_chosen_logp"] for r in rows] + [r["ref_rejected_logp"] for r in rows],
                                          dtype=torch.float64)
    return batch
