"""Programmatic rewards, usable wherever a reward source is (``rule:NAME`` in PPO's ``reward_model``, eval's
``judges``, the reward server): a rule is a function ``(prompt: str, response: str) -> float`` of the last user
turn and the response.

Rules come from three places, looked up in this order:
  RULES              rules registered in code with ``@register_rule("name")``
  entry points       any installed package can add rules under the ``tristage.rules`` entry-point group
                     (this is how the demo adds ``gold_judge``: see pyproject.toml and stages/demo/judge.py)
  RULE_FACTORIES     rules that take an argument: ``rule:NAME:ARG`` (``rule:keyword:please``)
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable

Rule = Callable[[str, str], float]
ENTRY_POINT_GROUP = "tristage.rules"

RULES: dict[str, Rule] = {}


def register_rule(name: str):
    def wrap(rule: Rule) -> Rule:
        RULES[name] = rule
        return rule

    return wrap


def keyword_rule(word: str) -> Rule:
    """rule:keyword:WORD — the number of times WORD occurs in the response (a simple, steerable reward)."""
    def count(prompt: str, response: str) -> float:
        return float(response.count(word))

    return count


RULE_FACTORIES: dict[str, Callable[[str], Rule]] = {"keyword": keyword_rule}


def installed_rules() -> dict[str, object]:
    """Entry points of the ``tristage.rules`` group, by name (loaded only when a rule is used)."""
    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def find_rule(name: str, arg: str = "") -> Rule | None:
    """The rule ``rule:NAME`` (or ``rule:NAME:ARG`` for a factory), or None if no such rule is known."""
    if arg:
        return RULE_FACTORIES[name](arg) if name in RULE_FACTORIES else None
    if name not in RULES and name in (points := installed_rules()):
        RULES[name] = points[name].load()
    return RULES.get(name)


def known_rules() -> list[str]:
    return sorted({*RULES, *installed_rules()}) + [f"{name}:ARG" for name in RULE_FACTORIES]
