"""Agreement between annotators and the export of labels into the RM stage's preference format.

Pure functions over {item: [choice, ...]} (choices A, B, tie; skips are not answers).
"""
from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

ANSWERS = ("A", "B", "tie")


def percent_agreement(labels: dict[int, list[str]]) -> float | None:
    """Share of agreeing pairs of answers, over items with at least two answers."""
    agree = total = 0
    for answers in labels.values():
        for a, b in itertools.combinations(answers, 2):
            agree += a == b
            total += 1
    return agree / total if total else None


def cohen_kappa(first: list[str], second: list[str]) -> float | None:
    """Two annotators on the same items: (p_o - p_e) / (1 - p_e)."""
    if not first or len(first) != len(second):
        return None
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second)) / n
    count_a, count_b = Counter(first), Counter(second)
    expected = sum(count_a[c] * count_b[c] for c in ANSWERS) / (n * n)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(labels: dict[int, list[str]]) -> float | None:
    """Fleiss' kappa over the items that have the same number (>= 2) of answers as the most common count."""
    sizes = Counter(len(a) for a in labels.values() if len(a) >= 2)
    if not sizes:
        return None
    n = sizes.most_common(1)[0][0]
    rows = [Counter(a) for a in labels.values() if len(a) == n]
    per_item = [(sum(c * c for c in row.values()) - n) / (n * (n - 1)) for row in rows]
    p_bar = sum(per_item) / len(rows)
    shares = [sum(row[c] for row in rows) / (len(rows) * n) for c in ANSWERS]
    p_e = sum(p * p for p in shares)
    return 1.0 if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def majority(answers: list[str]) -> str | None:
    """The most common answer; None on a tie between the top answers."""
    counts = Counter(answers).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def export_preferences(items: list[dict], labels: dict[int, list[str]], path: str | Path, ties: str = "drop",
                       min_answers: int = 1) -> dict:
    """Write prompt/chosen/rejected records (the RM stage's ``prompt_chosen_rejected`` format) by majority vote over
    each item's answers. A majority "tie" never becomes a preference: it is dropped (``ties="drop"``) or written with
    ``"tie": true`` (``ties="tie"``), which the reward model's loss reads as p = 0.5 (either side equally likely to be
    preferred). Items without a majority, with fewer than ``min_answers`` answers, or whose two responses are identical
    (nothing to prefer) are left out; the counts say how many."""
    if ties not in ("drop", "tie"):
        raise ValueError(f"ties must be drop or tie, not {ties!r}")
    written = {"pairs": 0, "ties": 0, "ties_dropped": 0, "no_majority": 0, "too_few": 0, "identical": 0}
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            if item["response_a"] == item["response_b"]:
                written["identical"] += 1
                continue
            answers = [a for a in labels.get(item["id"], []) if a in ANSWERS]
            if len(answers) < min_answers:
                written["too_few"] += 1
                continue
            winner = majority(answers)
            if winner is None:
                written["no_majority"] += 1
                continue
            if winner == "tie":
                if ties == "drop":
                    written["ties_dropped"] += 1
                    continue
                record = {"prompt": item["prompt"], "chosen": item["response_a"], "rejected": item["response_b"], "tie": True}
                written["ties"] += 1
            else:
                chosen, rejected = (item["response_a"], item["response_b"]) if winner == "A" else (item["response_b"], item["response_a"])
                record = {"prompt": item["prompt"], "chosen": chosen, "rejected": rejected}
                written["pairs"] += 1
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return written
