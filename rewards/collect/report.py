"""What the admin page and ``tristage collect stats|export`` report, read from the store."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .agreement import cohen_kappa, export_preferences, fleiss_kappa, percent_agreement
from .store import LabelStore


def answers_by_item(store: LabelStore) -> dict[int, list[str]]:
    answers: dict[int, list[str]] = defaultdict(list)
    for row in store.labels():
        if row["choice"] != "skip":
            answers[row["item_id"]].append(row["choice"])
    return dict(answers)


def collection_stats(store: LabelStore, labels_per_item: int) -> dict:
    labels = store.labels()
    per_annotator: dict[str, dict] = {}
    by_annotator_item: dict[str, dict[int, str]] = defaultdict(dict)
    for row in labels:
        stats = per_annotator.setdefault(row["annotator"], {"labels": 0, "skips": 0, "first": row["created"], "last": row["created"],
                                                            "seconds": 0.0})
        stats["labels"] += 1
        stats["skips"] += row["choice"] == "skip"
        stats["last"] = row["created"]
        stats["seconds"] += row["seconds"] or 0.0
        if row["choice"] != "skip":
            by_annotator_item[row["annotator"]][row["item_id"]] = row["choice"]
    for stats in per_annotator.values():
        hours = max(stats["last"] - stats["first"], 1.0) / 3600
        stats["labels_per_hour"] = round(stats["labels"] / hours, 1)
        stats["mean_seconds_per_label"] = round(stats.pop("seconds") / max(stats["labels"], 1), 2)
    answers = answers_by_item(store)
    multi = {k: v for k, v in answers.items() if len(v) >= 2}
    names = sorted(by_annotator_item)
    pairwise = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(by_annotator_item[a]) & set(by_annotator_item[b]))
            if shared:
                pairwise[f"{a} vs {b}"] = {"items": len(shared), "cohen_kappa": cohen_kappa(
                    [by_annotator_item[a][k] for k in shared], [by_annotator_item[b][k] for k in shared])}
    items = len(store.items())
    return {
        "items": items, "labels": len(labels), "labels_per_item": labels_per_item,
        "items_complete": sum(1 for v in answers.values() if len(v) >= labels_per_item),
        "annotators": per_annotator,
        "agreement": {"items_with_several_answers": len(multi), "percent": percent_agreement(multi),
                      "fleiss_kappa": fleiss_kappa(multi), "cohen_kappa_by_pair": pairwise},
    }


def export_store(store: LabelStore, path: str | Path, ties: str = "drop", min_answers: int = 1) -> dict:
    items = [{"id": row["id"], "prompt": json.loads(row["prompt"]), "response_a": row["response_a"],
              "response_b": row["response_b"]} for row in store.items()]
    return export_preferences(items, answers_by_item(store), path, ties=ties, min_answers=min_answers)
