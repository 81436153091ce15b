"""Programmatic rewards. ``gold_judge`` is the demo task's ground-truth preference: the simulated human
whose (noisy) labels train the reward model, and the judge that eval uses to tell whether RLHF helped."""
from __future__ import annotations

import re

from stages.demo.task import ATTRIBUTE_INDEX, POLITE_CLOSES, PRODUCTS, question_for_prompt

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


RULES = {"gold_judge": gold_judge}


def keyword_rule(word: str):
    """rule:keyword:WORD — the number of times WORD occurs in the response (a simple, steerable reward)."""
    def count(prompt: str, response: str) -> float:
        return float(response.count(word))

    return count


# Rules that take an argument: rule:NAME:ARG
RULE_FACTORIES = {"keyword": keyword_rule}
