"""BLEU and ROUGE-L of each model's responses against the reference answers the eval prompts carry (an Alpaca
``output``, a conversation's last assistant turn, a prompt record's ``reference``), as the fine-tuning literature
reports them. sacrebleu computes corpus BLEU, rouge-score sentence ROUGE-L F1 (averaged over responses); both
x 100. Chinese is tokenized per character (sacrebleu's ``zh``; for ROUGE-L each CJK character is a token), as
LLaMA-Factory's predict does. CIs resample prompts, as stages/eval/stats.py does: BLEU is recomputed from the
resampled prompts' summed n-gram statistics (sacrebleu's own bootstrap works the same way)."""
from __future__ import annotations

import re

import numpy as np

from .stats import _prompt_resamples, mean_with_ci

TOKENIZERS = ("auto", "13a", "zh")
# CJK ideographs, their punctuation and full-width forms: one token each under "zh"
CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
ZH_TOKEN = re.compile(f"[{CJK}]|[^\\s{CJK}]+")


def resolve_tokenizer(name: str, references: list[str]) -> str:
    """auto: zh when any reference holds a CJK character, else 13a (sacrebleu's default)."""
    if name != "auto":
        return name
    return "zh" if any(re.search(f"[{CJK}]", r) for r in references) else "13a"


class _ZhTokenizer:
    """rouge-score tokenizer: each CJK character a token, other runs of non-space characters lowercased words (rouge-score's
    default tokenizer keeps only [a-z0-9], which would drop Chinese entirely)."""

    def tokenize(self, text: str) -> list[str]:
        return [t.lower() for t in ZH_TOKEN.findall(text)]


def bleu_statistics(hypotheses: list[str], references: list[str], tokenize: str) -> np.ndarray:
    """Per response: sacrebleu's sufficient statistics (matching and total n-grams for n = 1..4, lengths)."""
    from sacrebleu.metrics import BLEU

    return np.asarray(BLEU(tokenize=tokenize)._extract_corpus_statistics(hypotheses, [references]), dtype=np.int64)


def bleu_from_statistics(stats: np.ndarray, tokenize: str) -> float:
    """Corpus BLEU from statistics summed over the responses (what sacrebleu.corpus_bleu computes)."""
    from sacrebleu.metrics import BLEU

    return float(BLEU(tokenize=tokenize)._compute_score_from_stats([int(x) for x in stats]).score)


def rouge_l(hypotheses: list[str], references: list[str], tokenize: str) -> np.ndarray:
    """Per response: ROUGE-L F1 x 100 (rouge-score, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_ZhTokenizer() if tokenize == "zh" else None)
    return np.array([100.0 * scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)])


def reference_scores(texts: list[str], references: list[str], samples: int, tokenize: str, rounds: int, seed: int,
                     level: float = 0.95) -> dict:
    """BLEU and ROUGE-L with bootstrap CIs of one model: ``texts`` are prompt-major (prompts x samples), ``references`` one
    per prompt."""
    prompts = len(references)
    repeated = [ref for ref in references for _ in range(samples)]
    per_prompt = bleu_statistics(texts, repeated, tokenize).reshape(prompts, samples, -1).sum(axis=1)
    resampled = [bleu_from_statistics(per_prompt[idx].sum(axis=0), tokenize) for idx in _prompt_resamples(prompts, rounds, seed)]
    tail = (1.0 - level) / 2 * 100
    bleu = bleu_from_statistics(per_prompt.sum(axis=0), tokenize)
    rouge, lo, hi = mean_with_ci(rouge_l(texts, repeated, tokenize).reshape(prompts, samples), rounds, seed, level)
    return {"bleu": {"mean": bleu, "ci": [float(np.percentile(resampled, tail)), float(np.percentile(resampled, 100 - tail))]},
            "rouge_l": {"mean": rouge, "ci": [lo, hi]}}
