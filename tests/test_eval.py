"""Eval (SFT-only vs RLHF and any other comparison) and the `all` pipeline, on the tiny test model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from conftest import FIXTURES, ROOT, assert_ok, run_stage


def test_bootstrap_ci_matches_a_naive_loop():
    from stages.eval.stats import mean_with_ci, win_outcomes, win_rate_with_ci

    rng = np.random.default_rng(1)
    scores = rng.normal(size=(10, 3))
    mean, lo, hi = mean_with_ci(scores, rounds=500, seed=7)
    picks = np.random.default_rng(7).integers(0, 10, size=(500, 10))
    naive = sorted(sum(scores[i].mean() for i in row) / 10 for row in picks)
    assert mean == pytest.approx(scores.mean())
    assert lo == pytest.approx(np.percentile(naive, 2.5)) and hi == pytest.approx(np.percentile(naive, 97.5))
    assert win_outcomes([2.0, 1.0, 1.0], [1.0, 1.0, 3.0]).tolist() == [1.0, 0.5, 0.0]
    rate, lo, hi = win_rate_with_ci(scores + 10, scores)
    assert rate == 1.0 and lo == 1.0


def eval_stage(tmp_path, *overrides):
    out = tmp_path / "eval"
    result = run_stage("eval", f"dataset={FIXTURES / 'alpaca_en_demo_sample.json'}", f"output_dir={out}", "samples_per_prompt=4",
                       "max_new_tokens=12", "bootstrap_samples=500", *overrides, config=None)
    assert_ok(result)
    return json.loads((out / "eval_report.json").read_text()), out, result.stdout


def test_two_identical_models_tie_and_the_ci_contains_half(tmp_path, tiny_model):
    twin = tmp_path / "twin"
    shutil.copytree(tiny_model, twin)
    report, out, stdout = eval_stage(tmp_path, f"models=[{tiny_model},{twin}]", "model_names=[a,b]",
                                     "judges=[rule:keyword:e,rule:gold_judge]", f"export_pairs={tmp_path / 'pairs.jsonl'}")
    for row in report["win_rates"]:
        assert row["ci"][0] <= 0.5 <= row["ci"][1], row
    assert report["models"]["a"]["kl_to_reference"]["mean"] == pytest.approx(0.0, abs=1e-4)
    assert report["models"]["a"]["judges"] == report["models"]["b"]["judges"]
    assert (out / "eval_report.png").stat().st_size > 10_000
    assert "pairwise win rates" in stdout
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 8 * 4 and {p["source_a"] for p in pairs} == {"a", "b"}  # A/B order randomized
    assert all(p["prompt"][-1]["role"] == "user" and p["response_a"] == p["response_b"] for p in pairs)


def test_a_different_model_is_told_apart(tmp_path, tiny_model, keyword_policy):
    """A model trained towards the letter e beats the base on rule:keyword:e, with a CI above 50%."""
    report, _, _ = eval_stage(tmp_path, f"models=[{tiny_model},{keyword_policy}]", "model_names=[base,ppo]", "judges=[rule:keyword:e]",
                              "samples_per_prompt=8")
    [row] = report["win_rates"]
    assert row["a"] == "ppo" and row["ci"][0] > 0.5
    assert report["models"]["ppo"]["kl_to_reference"]["mean"] > 0.1


def test_an_adapter_and_its_exported_merge_get_the_same_figures(tmp_path, tiny_model):
    adapter, merged = tmp_path / "lora", tmp_path / "merged"
    assert_ok(run_stage("sft", f"model_name_or_path={tiny_model}", f"output_dir={adapter}", "finetuning_type=lora",
                        "learning_rate=2e-2", "max_steps=8"))
    assert_ok(run_stage("export", "--adapter", str(adapter), "--out", str(merged), config=None))
    report, out, _ = eval_stage(tmp_path, f"models=[{adapter},{merged}]", "model_names=[adapter,merged]",
                                f"reference_model={tiny_model}", "judges=[rule:keyword:e,rule:gold_judge]")
    a, b = report["models"]["adapter"], report["models"]["merged"]
    assert a["kl_to_reference"]["mean"] > 0.01  # the adapter really changed the model
    assert a["kl_to_reference"]["mean"] == pytest.approx(b["kl_to_reference"]["mean"], rel=1e-3)
    for judge in a["judges"]:
        assert a["judges"][judge]["mean"] == pytest.approx(b["judges"][judge]["mean"], abs=1e-9)
    assert a["response_length"] == b["response_length"]


def test_eval_refuses_a_missing_model(tmp_path, tiny_model, capsys):
    from stages.cli import main

    code = main(["eval", f"models=[{tiny_model},/no/such/model]", f"dataset={FIXTURES / 'alpaca_en_demo_sample.json'}",
                 f"output_dir={tmp_path / 'e'}"])
    assert code == 2 and "models" in capsys.readouterr().err


@pytest.fixture()
def tiny_config_dir(tmp_path, tiny_model):
    """A config folder for `all` on the tiny model: each stage reads the previous stage's output_dir."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Tell me about {t}.", "chosen": f"Sure, {t} is nice. Thanks!", "rejected": "No."})
                             + "\n" for t in ["tea", "the lamp", "a kettle", "my order", "shipping", "a refund", "the color", "a pillow"]))
    base = yaml.safe_load((FIXTURES / "sft_tiny.yaml").read_text())
    configs = {
        "sft": {**base, "model_name_or_path": str(tiny_model), "max_steps": 6, "output_dir": "runs/x/sft"},
        "rm": {**yaml.safe_load((FIXTURES / "rm_tiny.yaml").read_text()), "model_name_or_path": "runs/x/sft",
               "dataset": [str(pairs)], "eval_dataset": [str(pairs)], "eval_strategy": "steps", "eval_steps": 4, "max_steps": 8,
               "output_dir": "runs/x/rm"},
        "ppo": {**yaml.safe_load((FIXTURES / "ppo_tiny.yaml").read_text()), "model_name_or_path": "runs/x/sft",
                "reward_model": ["runs/x/rm"], "critic_init": "reward", "max_steps": 2, "output_dir": "runs/x/ppo"},
        "grpo": {**yaml.safe_load((FIXTURES / "grpo_tiny.yaml").read_text()), "model_name_or_path": "runs/x/sft",
                 "reward_model": ["runs/x/rm"], "max_steps": 2, "output_dir": "runs/x/grpo"},
        "dpo": {**yaml.safe_load((FIXTURES / "dpo_tiny.yaml").read_text()), "model_name_or_path": "runs/x/sft", "dataset": [str(pairs)],
                "max_steps": 4, "output_dir": "runs/x/dpo"},
        "eval": {"models": ["runs/x/sft", "runs/x/ppo", "runs/x/grpo"], "model_names": ["sft", "rlhf", "grpo"],
                 "judges": ["rule:keyword:e", "runs/x/rm"],
                 "dataset": [str(FIXTURES / "alpaca_en_demo_sample.json")], "samples_per_prompt": 2, "max_new_tokens": 8,
                 "bootstrap_samples": 200, "output_dir": "runs/x/eval"},
    }
    folder = tmp_path / "configs"
    folder.mkdir()
    for stage, values in configs.items():
        (folder / f"{stage}.yaml").write_text(yaml.safe_dump(values))
    return folder


def run_all(*args):
    import subprocess
    import sys
    import os

    return subprocess.run([str(ROOT / "launch" / "run_stage.sh"), "all", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "NUM_GPUS": "0"}, timeout=900)


@pytest.mark.slow
def test_all_chains_the_stages_skips_finished_ones_and_routes_overrides(tmp_path, tiny_config_dir):
    run_dir = tmp_path / "run"
    first = run_all("--config-dir", str(tiny_config_dir), "--run-dir", str(run_dir), "rm.learning_rate=0.02", "seed=3")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage, marker in [("sft", "trainer_state.json"), ("rm", "trainer_state.json"), ("ppo", "trainer_state.json"),
                          ("eval", "eval_report.json")]:
        assert (run_dir / stage / marker).is_file(), stage
    rm_config = yaml.safe_load((run_dir / "rm" / "tristage_config.yaml").read_text())
    assert rm_config["model_name_or_path"] == str(run_dir / "sft") and rm_config["learning_rate"] == 0.02 and rm_config["seed"] == 3
    ppo_config = yaml.safe_load((run_dir / "ppo" / "tristage_config.yaml").read_text())
    assert ppo_config["reward_model"] == [str(run_dir / "rm")] and ppo_config["learning_rate"] != 0.02
    report = json.loads((run_dir / "eval" / "eval_report.json").read_text())
    assert report["settings"]["models"] == [str(run_dir / "sft"), str(run_dir / "ppo")] and report["settings"]["seed"] == 3
    assert "rlhf beats sft" in first.stdout and "reward model:" in first.stdout

    again = run_all("--config-dir", str(tiny_config_dir), "--run-dir", str(run_dir))
    assert again.returncode == 0 and again.stdout.count("already finished") == 4
    forced = run_all("--config-dir", str(tiny_config_dir), "--run-dir", str(run_dir), "--force", "--stages", "eval")
    assert forced.returncode == 0 and "running eval" in forced.stdout and "running sft" not in forced.stdout


@pytest.mark.slow
def test_all_trains_grpo_beside_ppo_and_eval_compares_what_exists(tmp_path, tiny_config_dir):
    run_dir = tmp_path / "run"
    first = run_all("--config-dir", str(tiny_config_dir), "--run-dir", str(run_dir), "--stages", "sft,rm,grpo,eval")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"eval leaves out the model {run_dir / 'ppo'}: ppo has no finished run there" in first.stdout and not (run_dir / "ppo").exists()
    grpo_config = yaml.safe_load((run_dir / "grpo" / "tristage_config.yaml").read_text())
    assert grpo_config["advantage_estimator"] == "grpo" and grpo_config["reward_model"] == [str(run_dir / "rm")]
    assert not (run_dir / "grpo" / "critic").exists() and "grpo (grpo): final KL" in first.stdout
    report = json.loads((run_dir / "eval" / "eval_report.json").read_text())
    assert list(report["models"]) == ["sft", "grpo"]

    both = run_all("--config-dir", str(tiny_config_dir), "--run-dir", str(run_dir), "--stages", "ppo,eval", "--force")
    assert both.returncode == 0, both.stdout[-3000:] + both.stderr[-3000:]
    report = json.loads((run_dir / "eval" / "eval_report.json").read_text())
    assert list(report["models"]) == ["sft", "rlhf", "grpo"] and "leaves out" not in both.stdout
    assert {(r["a"], r["b"]) for r in report["win_rates"]} == {("rlhf", "sft"), ("grpo", "sft"), ("grpo", "rlhf")}


@pytest.mark.slow
def test_all_runs_sft_dpo_eval_without_a_reward_model(tmp_path, tiny_config_dir):
    run_dir = tmp_path / "run"
    result = run_all("--config-dir", str(tiny_config_dir), "--run-dir", str(run_dir), "--stages", "sft,dpo,eval",
                     f"eval.models=[{run_dir / 'sft'},{run_dir / 'dpo'}]", "eval.model_names=[sft,dpo]")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (run_dir / "rm").exists() and f"eval leaves out the judge {run_dir / 'rm'}: rm has no finished run" in result.stdout
    dpo_config = yaml.safe_load((run_dir / "dpo" / "tristage_config.yaml").read_text())
    assert dpo_config["model_name_or_path"] == str(run_dir / "sft") and "dpo: final rewards/accuracies" in result.stdout
    report = json.loads((run_dir / "eval" / "eval_report.json").read_text())
    assert list(report["models"]) == ["sft", "dpo"] and {r["judge"] for r in report["win_rates"]} == {"rule:keyword:e"}
    assert {(r["a"], r["b"]) for r in report["win_rates"]} == {("dpo", "sft")}


def test_all_refuses_a_stage_it_does_not_have(tmp_path, tiny_config_dir):
    result = run_all("--config-dir", str(tiny_config_dir), "--run-dir", str(tmp_path / "run"), "--stages", "sft,dpo2")
    assert result.returncode == 2 and "key 'stages': 'dpo2' is not one of sft, rm, ppo, grpo, dpo, eval" in result.stderr
    assert not (tmp_path / "run" / "sft").exists()


@pytest.mark.slow
def test_all_stops_at_a_failing_stage_with_its_exit_code(tmp_path, tiny_config_dir):
    run_dir = tmp_path / "run"
    result = run_all("--config-dir", str(tiny_config_dir), "--run-dir", str(run_dir), "--stages", "rm,ppo",
                     "rm.dataset=[/no/such/pairs.jsonl]")
    assert result.returncode == 2
    assert "rm" in result.stdout and "failed (2)" in result.stdout and not (run_dir / "ppo").exists()


def test_a_models_own_generation_settings_reach_eval_only_when_asked(tmp_path, tiny_model):
    import json as _json

    from conftest import run_in_process

    opinionated = tmp_path / "opinionated"
    shutil.copytree(tiny_model, opinionated)
    settings = _json.loads((opinionated / "generation_config.json").read_text())
    settings.update(repetition_penalty=5.0, no_repeat_ngram_size=1)
    (opinionated / "generation_config.json").write_text(_json.dumps(settings))

    def texts(*extra):
        out = tmp_path / f"eval{len(extra)}"
        result = run_in_process("eval", f"models=[{tiny_model},{opinionated}]", "model_names=[plain,opinionated]",
                                "judges=[rule:keyword:e]", f"dataset={FIXTURES / 'alpaca_en_demo_sample.json'}", f"output_dir={out}",
                                "samples_per_prompt=2", "max_new_tokens=12", "bootstrap_samples=50", *extra, config=None)
        assert result.returncode == 0, result.stderr[-2000:]
        rows = [_json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
        return [r["response"] for r in rows if r["model"] == "plain"], [r["response"] for r in rows if r["model"] == "opinionated"]

    plain, opinionated_texts = texts()
    assert plain == opinionated_texts  # the same weights sample the same: generation_config.json stayed out
    plain, opinionated_texts = texts("use_model_generation_config=true")
    assert plain != opinionated_texts  # asked for: the penalties apply
