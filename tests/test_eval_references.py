"""Reference-based metrics in eval: BLEU and ROUGE-L against the references the prompts carry equal the libraries' own
corpus scores (sacrebleu, rouge-score) for English and Chinese (per character), their bootstrap CIs equal a naive
loop's, and the references come from every format that has one."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FIXTURES, assert_ok, run_in_process

ENGLISH = (["the cat sat on the mat", "a dog barks at night", "hello there friend", "it is raining today", "the lamp is blue"],
           ["the cat is on the mat", "a dog barks loudly at night", "hi there friend", "today it is raining", "the lamp is red"])
CHINESE = (["我爱北京天安门", "今天天气很好", "这个台灯是蓝色的", "请问有什么可以帮您", "退款需要三天"],
           ["我爱北京", "今天天气不错", "这个台灯是红色的", "请问需要什么帮助", "退款需要三到五天"])


def lcs(a: list, b: list) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def naive_rouge_l(hyp: list, ref: list) -> float:
    common = lcs(hyp, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return 100 * 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("language", ["english", "chinese"])
def test_bleu_and_rouge_l_equal_the_libraries_corpus_scores(language):
    import sacrebleu
    from rouge_score import rouge_scorer

    from stages.eval.references import reference_scores, resolve_tokenizer, rouge_l

    hyps, refs = ENGLISH if language == "english" else CHINESE
    tokenize = resolve_tokenizer("auto", refs)
    assert tokenize == ("13a" if language == "english" else "zh")
    # two samples per prompt: the second is the first with a word (a character) dropped
    texts = [t for h in hyps for t in (h, h[: len(h) // 2] + h[len(h) // 2 + 1 :])]
    scores = reference_scores(texts, refs, 2, tokenize, rounds=50, seed=3)
    repeated = [r for r in refs for _ in range(2)]
    assert scores["bleu"]["mean"] == pytest.approx(sacrebleu.corpus_bleu(texts, [repeated], tokenize=tokenize).score, abs=1e-9)
    assert 5 < scores["bleu"]["mean"] < 95
    if language == "english":
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        expected = [100 * scorer.score(r, t)["rougeL"].fmeasure for t, r in zip(texts, repeated)]
    else:  # per character, against a naive LCS
        expected = [naive_rouge_l(list(t), list(r)) for t, r in zip(texts, repeated)]
    assert rouge_l(texts, repeated, tokenize) == pytest.approx(expected, abs=1e-9)
    assert scores["rouge_l"]["mean"] == pytest.approx(np.mean(expected), abs=1e-9)


def test_the_bleu_ci_resamples_prompts_as_a_naive_loop_does():
    import sacrebleu

    from stages.eval.references import reference_scores

    hyps, refs = ENGLISH
    texts = [t for h in hyps for t in (h, h.upper())]
    scores = reference_scores(texts, refs, 2, "13a", rounds=40, seed=5)
    picks = np.random.default_rng(5).integers(0, len(refs), size=(40, len(refs)))
    naive = [sacrebleu.corpus_bleu([texts[2 * i + s] for i in row for s in range(2)], [[refs[i] for i in row for _ in range(2)]]).score
             for row in picks]
    assert scores["bleu"]["ci"] == pytest.approx([np.percentile(naive, 2.5), np.percentile(naive, 97.5)], abs=1e-9)


def test_prompt_rows_carry_the_reference_of_every_format_that_has_one(tmp_path, tiny_model):
    from stages.common.backbone import load_tokenizer
    from stages.common.config import DataArguments, ModelArguments
    from stages.common.data import build_prompt_data

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi?", "reference": "Hello!"}) + "\n" + json.dumps({"prompt": "Bye?"}) + "\n")

    def references(path):
        rows = build_prompt_data(DataArguments(dataset=[str(path)]), tokenizer, seed=0, max_prompt_length=512).train
        return sorted((r["reference"] or "") for r in rows)

    alpaca = json.loads((FIXTURES / "alpaca_en_demo_sample.json").read_text())
    assert references(FIXTURES / "alpaca_en_demo_sample.json") == sorted(r["output"] for r in alpaca)
    conversations = [json.loads(line) for line in (FIXTURES / "messages_sample.jsonl").read_text().splitlines()]
    last = sorted([m["content"] for m in c["messages"] if m["role"] == "assistant"][-1] for c in conversations)
    assert references(FIXTURES / "messages_sample.jsonl") == last
    assert references(prompts) == ["", "Hello!"]


def test_eval_reports_bleu_and_rouge_l_per_model_on_chinese_references(tmp_path, tiny_model):
    import sacrebleu

    out = tmp_path / "eval"
    result = run_in_process("eval", f"models=[{tiny_model}]", f"dataset={FIXTURES / 'alpaca_zh_demo_sample.json'}", f"output_dir={out}",
                            "samples_per_prompt=2", "max_new_tokens=8", "bootstrap_samples=100", "judges=[rule:keyword:e]", config=None)
    assert_ok(result)
    report = json.loads((out / "eval_report.json").read_text())
    assert report["settings"]["reference_tokenize_used"] == "zh" and report["settings"]["reference_prompts"] > 0
    [model] = report["models"].values()
    responses = [json.loads(line)["response"] for line in (out / "responses.jsonl").read_text().splitlines()]
    from stages.common.backbone import load_tokenizer
    from stages.common.config import DataArguments, ModelArguments
    from stages.common.data import build_prompt_data

    rows = build_prompt_data(DataArguments(dataset=[str(FIXTURES / "alpaca_zh_demo_sample.json")]),
                             load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model))), seed=0, max_prompt_length=256).train
    refs = [r["reference"] for r in rows for _ in range(2)]
    assert model["references"]["bleu"]["mean"] == pytest.approx(sacrebleu.corpus_bleu(responses, [refs], tokenize="zh").score, abs=1e-9)
    assert "BLEU" in result.stdout and "ROUGE-L" in result.stdout


def test_a_bad_reference_tokenizer_is_refused(tmp_path, tiny_model):
    result = run_in_process("eval", f"models=[{tiny_model}]", f"dataset={FIXTURES / 'alpaca_en_demo_sample.json'}",
                            f"output_dir={tmp_path / 'e'}", "reference_tokenize=jieba", config=None)
    assert result.returncode == 2 and "key 'reference_tokenize'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
