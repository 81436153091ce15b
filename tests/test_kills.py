"""SIGKILL at random points of every stage — after a checkpoint, in the middle of training and inside a save —
then resume: the final metrics and weights equal an uninterrupted run's (CPU, fixed seed). Fourteen kills in all."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FIXTURES, ROOT, TINY_SFT, assert_ok, read_metrics, run_stage

pytestmark = pytest.mark.slow  # fourteen SIGKILLs and resumes: about 4 minutes

STAGES = {  # stage: (config, overrides, the final step, what must match, the saved weights)
    "sft": (TINY_SFT, ["max_steps=12", "save_steps=2"], 12, ["loss", "grad_norm"], ["model.safetensors"]),
    "rm": (FIXTURES / "rm_tiny.yaml", ["max_steps=12", "save_steps=2", "max_length=512", f"dataset={FIXTURES / 'dpo_en_demo_sample.json'}"], 12,
           ["loss", "accuracy", "grad_norm"], ["model.safetensors"]),
    "ppo": (FIXTURES / "ppo_tiny.yaml", ["max_steps=6", "save_steps=1", "adaptive_kl=true", "kl_target=0.5", "kl_horizon=100",
                                          "ema_decay=0.5"], 6,
            ["score", "kl", "beta", "next_beta", "policy_loss", "value_loss", "approx_kl", "entropy"],
            ["model.safetensors", "ema/model.safetensors"]),
    # stage 3 with GRPO: groups of 4 and dynamic sampling; 4 new tokens leave many groups without signal, so top-up rounds run
    "grpo": (FIXTURES / "grpo_tiny.yaml", ["max_steps=6", "save_steps=1", "dynamic_sampling=true", "max_new_tokens=4"], 6,
             ["score", "kl", "policy_loss", "kl_loss", "approx_kl", "entropy", "group_reward_std", "dynamic_sampling_dropped",
              "dynamic_sampling_rounds"], ["model.safetensors"]),
    # DPO (full, the reference's log-probs precomputed again on resume) on the realistic pair file
    "dpo": (FIXTURES / "dpo_tiny.yaml", ["max_steps=12", "save_steps=2", "max_length=512", f"dataset={FIXTURES / 'dpo_en_demo_sample.json'}",
                                         "precompute_ref_log_probs=true", "per_device_train_batch_size=2", "gradient_accumulation_steps=1"],
            12, ["loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"], ["model.safetensors"]),
}
COMMAND = {"grpo": "ppo"}  # the stage that runs an entry
# where each kill lands: after checkpoint N (plus a random 0-0.3 s, so mid-training), or inside a save
KILLS = {"sft": [("after", 2), ("after", 4), ("after", 6), ("after", 8)],  # a tiny SFT save is too quick to hit reliably
         "rm": [("after", 2), ("in_save", None), ("after", 8)],
         "ppo": [("after", 1), ("in_save", None), ("after", 4)],
         "grpo": [("after", 2), ("after", 4)],
         "dpo": [("after", 2), ("after", 6)]}


def by_step(metrics: list[dict]) -> dict[int, dict]:
    """Entries merged per step; each attempt appends, so a later entry for a step overrides an earlier one."""
    steps: dict[int, dict] = {}
    for entry in metrics:
        steps.setdefault(entry["step"], {}).update(entry)
    return steps


def checkpoints(out):
    return sorted(int(p.name.split("-")[-1]) for p in out.glob("checkpoint-*[0-9]"))


def kill_when(stage: str, common: list[str], out, where: str, step, rng: random.Random) -> str:
    """Start (or resume) the stage, SIGKILL its process group at the planned point; returns what was hit."""
    config = STAGES[stage][0]
    command = [str(ROOT / "launch" / "run_stage.sh"), COMMAND.get(stage, stage), "--config", str(config), *common, f"output_dir={out}",
               "resume_from_checkpoint=last"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable, "NUM_GPUS": "0"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, hit = time.time() + 300, None
    while hit is None and time.time() < deadline and process.poll() is None:
        if where == "in_save" and list(out.glob("checkpoint-*.tmp")):
            hit = "inside a save"
        elif where == "after" and step in checkpoints(out):
            time.sleep(rng.uniform(0.0, 0.1))
            hit = f"after checkpoint-{step}"
        else:
            time.sleep(0.005)
    if process.poll() is not None:
        pytest.fail(f"{stage} finished before the planned kill ({where} {step})")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return hit


@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, tiny_model, stage):
    from safetensors.torch import load_file

    config, overrides, last_step, keys, weights = STAGES[stage]
    common = [f"model_name_or_path={tiny_model}", "save_strategy=steps", *overrides]
    straight = tmp_path / "straight"
    assert_ok(run_stage(COMMAND.get(stage, stage), *common, f"output_dir={straight}", config=config))

    killed, rng, hits = tmp_path / "killed", random.Random(stage), []
    for where, step in KILLS[stage]:
        hits.append(kill_when(stage, common, killed, where, step, rng))
        assert not (killed / "trainer_state.json").exists()  # it really died before finishing
    assert len(hits) == len(KILLS[stage]) and (("inside a save" in hits) == any(w == "in_save" for w, _ in KILLS[stage]))
    result = run_stage(COMMAND.get(stage, stage), *common, f"output_dir={killed}", "resume_from_checkpoint=last", config=config)
    assert_ok(result)
    assert not list(killed.glob("checkpoint-*.tmp"))  # the half-written checkpoint was never used, and is gone

    done, resumed = by_step(read_metrics(straight)), by_step(read_metrics(killed))
    for key in keys:
        assert resumed[last_step][key] == pytest.approx(done[last_step][key], rel=1e-5, abs=1e-7), key
    if stage == "grpo":  # the kills landed where top-up rounds ran
        assert any(m["dynamic_sampling_rounds"] > 1 for m in done.values()), done
    for name in weights:
        a, b = load_file(straight / name), load_file(killed / name)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
