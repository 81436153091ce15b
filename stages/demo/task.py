"""The demo task: a support assistant for a small fictional product catalog.

A customer asks one fact about one product; a good answer states the right fact, briefly, and closes
politely. Demonstrations are deliberately of mixed quality, like real human demos: some state another
product's fact, some forget the polite close, some ramble. The gold judge (``stages.demo.judge.gold_judge``)
scores a response; its simulated annotators (``stages.demo.judge.preference_records``) label preference pairs
with the gold judge plus label noise, the setup of Gao et al., "Scaling laws for reward model overoptimization".
"""
from __future__ import annotations

import random
from dataclasses import dataclass

PRODUCTS = [
    # name, price ($), color, warranty (years). Eight products (24 facts): with 16 the tiny reward model
    # could not learn which fact is right from the demo's ~600 pairs (held-out gold accuracy stuck at ~67%).
    ("Zephyr lamp", 25, "amber", 2),
    ("Orbit kettle", 40, "silver", 1),
    ("Nimbus pillow", 18, "white", 3),
    ("Falcon drill", 95, "orange", 5),
    ("Pebble speaker", 60, "teal", 4),
    ("Atlas backpack", 75, "black", 6),
    ("Comet blender", 55, "red", 7),
    ("Willow chair", 120, "green", 8),
]

ATTRIBUTES = {
    # attribute: (question templates, answer template)
    # Four phrasings per attribute: a held-out question is a product/phrasing combination no stage trained
    # on, while every phrasing and every fact is seen elsewhere.
    "price": (["What is the price of the {name}?", "How much does the {name} cost?", "How much is the {name}?",
               "What does the {name} sell for?"], "The {name} costs ${value}."),
    "color": (["What color is the {name}?", "Which color does the {name} come in?", "What colour is the {name}?",
               "Tell me the color of the {name}."], "The {name} is {value}."),
    "warranty": (
        ["How long is the warranty on the {name}?", "What warranty does the {name} have?",
         "How many years of warranty come with the {name}?", "Is the {name} under warranty, and for how long?"],
        "The {name} has a {value} year warranty.",
    ),
}
ATTRIBUTE_INDEX = {"price": 1, "color": 2, "warranty": 3}
POLITE_CLOSES = ["Happy to help!", "Glad to help!"]
RAMBLE = "Let me know if there is anything else at all that you would like to ask about our many products."
SYSTEM_PROMPT = "You are the support assistant of a small shop. Answer briefly and politely."


@dataclass(frozen=True)
class Question:
    product: str
    attribute: str
    text: str

    @property
    def answer(self) -> str:
        return str(fact(self.product, self.attribute))


def fact(product: str, attribute: str):
    row = next(p for p in PRODUCTS if p[0] == product)
    return row[ATTRIBUTE_INDEX[attribute]]


def all_questions() -> list[Question]:
    return [
        Question(name, attribute, template.format(name=name))
        for name, *_ in PRODUCTS
        for attribute, (templates, _answer) in ATTRIBUTES.items()
        for template in templates
    ]


def split_questions(seed: int = 0) -> tuple[list[Question], list[Question]]:
    """One phrasing of every fact is held out (a quarter of the questions): eval asks about facts the models
    have seen, in a wording no stage trained on for that product, so it tests the policy, not recall."""
    rng = random.Random(seed)
    train, held_out = [], []
    by_fact: dict[tuple[str, str], list[Question]] = {}
    for question in all_questions():
        by_fact.setdefault((question.product, question.attribute), []).append(question)
    for questions in by_fact.values():
        pick = rng.randrange(len(questions))
        held_out.append(questions[pick])
        train += [q for i, q in enumerate(questions) if i != pick]
    rng.shuffle(train)
    return train, held_out


def response(question: Question, *, right_fact: bool = True, polite: bool = True, ramble: bool = False, rng=None) -> str:
    rng = rng or random.Random(0)
    value = question.answer
    if not right_fact:
        others = sorted({str(fact(p[0], question.attribute)) for p in PRODUCTS} - {value})
        value = rng.choice(others)
    parts = [ATTRIBUTES[question.attribute][1].format(name=question.product, value=value)]
    if ramble:
        parts.append(RAMBLE)
    if polite:
        parts.append(rng.choice(POLITE_CLOSES))
    return " ".join(parts)


# Demonstration quality mix: (probability, right_fact, polite, ramble)
DEMO_MIX = [(0.35, True, True, False), (0.3, True, False, False), (0.15, False, True, False), (0.2, True, True, True)]


def sample_response(question: Question, rng: random.Random) -> str:
    draw, acc = rng.random(), 0.0
    for probability, right_fact, polite, ramble in DEMO_MIX:
        acc += probability
        if draw < acc:
            return response(question, right_fact=right_fact, polite=polite, ramble=ramble, rng=rng)
    return response(question, rng=rng)


def sft_records(questions: list[Question], per_question: int, seed: int) -> list[dict]:
    """Alpaca-format demonstrations of mixed quality."""
    rng = random.Random(seed)
    return [
        {"instruction": q.text, "input": "", "output": sample_response(q, rng), "system": SYSTEM_PROMPT}
        for q in questions
        for _ in range(per_question)
    ]


def prompt_records(questions: list[Question]) -> list[dict]:
    return [{"system": SYSTEM_PROMPT, "prompt": q.text} for q in questions]


def question_for_prompt(prompt: str) -> Question | None:
    for q in all_questions():
        if q.text == prompt.strip():
            return q
    return None


def corpus_lines() -> list[str]:
    """Text the demo tokenizer is trained on: every question and every kind of answer."""
    lines = [SYSTEM_PROMPT, RAMBLE, *POLITE_CLOSES, "### User:", "### Assistant:"]
    for i, q in enumerate(all_questions()):
        lines.append(q.text)
        lines.append(response(q, right_fact=True, rng=random.Random(i)))
        lines.append(response(q, right_fact=False, rng=random.Random(i)))
    return lines
