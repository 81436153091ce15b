"""The demo task's simulated human: the gold judge (the ground-truth preference of ``stages/demo/task.py``),
and the annotators who label preference pairs with it plus label noise (the setup of Gao et al., "Scaling
laws for reward model overoptimization"). Its labels train the reward model; eval uses it to tell whether
RLHF helped. Registered as
``rule:gold_judge`` through the ``tristage.rules`` entry point (pyproject.toml), so ``rewards`` never imports
the demo."""
from __future__ import annotations

import random
import re

from .task import ATTRIBUTE_INDEX, POLITE_CLOSES, PRODUCTS, SYSTEM_PROMPT, Question, question_for_prompt, sample_response

RIGHT_FACT = 1.0
POLITE_CLOSE = 0.3
WORDS_BEFORE_PENALTY = 16
PENALTY_PER_EXTRA_WORD = 0.02


def _values(attribute: str) -> set[str]:
    return {str(row[ATTRIBUTE_INDEX[attribute]]) for row in PRODUCTS}


def has_right_fact(prompt: str, response: str) -> bool:
    """The response states the asked fact and no other value of the same attribute."""
    question = question_for_prompt(prompt)
    if question is None:
        return False
    stated = set(re.findall(r"\w+", response.lower()))
    right = question.answer.lower()
    wrong = {v.lower() for v in _values(question.attribute)} - {right}
    return right in stated and not (stated & wrong)


def gold_judge(prompt: str, response: str) -> float:
    """+1 for the right fact (and no wrong one), +0.3 for a polite close, minus a little per word past 16."""
    score = RIGHT_FACT if has_right_fact(prompt, response) else 0.0
    if any(response.rstrip().endswith(close) for close in POLITE_CLOSES):
        score += POLITE_CLOSE
    score -= PENALTY_PER_EXTRA_WORD * max(0, len(response.split()) - WORDS_BEFORE_PENALTY)
    return round(score, 6)


def preference_records(questions: list[Question], per_question: int, seed: int, label_noise: float = 0.1) -> list[dict]:
    """Pairs of two sampled responses, labeled by the gold judge; a simulated annotator flips the label
    with probability ``label_noise``. Pairs the gold judge scores equal are skipped (no preference)."""
    rng = random.Random(seed)
    records = []
    for q in questions:
        made = 0
        for _attempt in range(per_question * 20):
            if made == per_question:
                break
            a, b = sample_response(q, rng), sample_response(q, rng)
            score_a, score_b = gold_judge(q.text, a), gold_judge(q.text, b)
            if score_a == score_b:
                continue
            chosen, rejected = (a, b) if score_a > score_b else (b, a)
            if rng.random() < label_noise:
                chosen, rejected = rejected, chosen
            records.append({"system": SYSTEM_PROMPT, "prompt": q.text, "chosen": chosen, "rejected": rejected})
            made += 1
    return records
