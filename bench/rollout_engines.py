"""Rollout engines: generated tokens/s of the vLLM engine vs the hf engine (transformers' generate), and PPO
episodes/s with each engine vs TRL's RLOOTrainer. Needs vLLM in the running environment (launch/install.sh --vllm):

    <venv with vllm>/bin/python -m bench.rollout_engines [--repeats 3]

Generation: the same engine interface PPO uses (``generate(prompts, n, seed)``), 64 of the demo's shop questions x 1
sample, 48 new tokens at temperature 1, after one warm-up call (the engine's start is reported apart), on random Llamas
with the demo tokenizer: the PPO benchmark's 4-block d=256 model, and a 12-block d=512 model (~30M parameters), in
float32 and bfloat16. PPO: bench/ppo_throughput.py's setting (64 episodes per update, 48 tokens, d=256), with
``rollout_engine`` hf or vllm, and TRL's RLOOTrainer, all three in this environment.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build_model, fmt_ratio, interleaved, parameter_count, print_table, ran_one_side, ratio, spread, start, write_result

ROWS, NEW_TOKENS, CALLS = 64, 48, 3
MODELS = {"d256": dict(layers=4, hidden=256, heads=4, vocab_size=512), "d512": dict(layers=12, hidden=512, heads=8, vocab_size=512)}
SETTINGS = [("d256", "float32"), ("d512", "float32"), ("d512", "bfloat16")]


def generation_side(work: Path, engine_name: str, model_key: str, dtype_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from bench.ppo_throughput import prepare
    from stages.common.backbone import load_tokenizer
    from stages.common.config import ModelArguments
    from stages.common.generation import SamplingArguments
    from stages.common.rollout import RolloutArguments
    from stages.common.rollout.weights import policy_weights

    _, prompts_file = prepare(work)
    model_dir = build_model(work / f"llama-{model_key}", **MODELS[model_key])
    dtype = getattr(torch, dtype_name)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model_dir)))
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=False)
             for r in (rows * 2)[:ROWS]]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    sampling = SamplingArguments(temperature=1.0, max_new_tokens=NEW_TOKENS, max_prompt_length=64)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    started = time.perf_counter()
    if engine_name == "vllm":
        from stages.common.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(str(model_dir), tokenizer, sampling, RolloutArguments(rollout_engine="vllm"), dtype, ROWS, seed=0)
        engine.load_weights(policy_weights(model))
    else:
        from stages.common.rollout.hf import HFEngine

        engine = HFEngine(model, tokenizer, sampling, ROWS, torch.device("cpu"))
    startup = time.perf_counter() - started
    engine.generate(prompts, 1, seed=0)  # warm-up
    tokens, started = 0, time.perf_counter()
    for call in range(CALLS):
        tokens += sum(len(r) for r in engine.generate(prompts, 1, seed=call + 1).response_ids)
    seconds = time.perf_counter() - started
    return {"tokens_per_second": tokens / seconds, "startup_seconds": startup, "tokens": tokens,
            "parameters": parameter_count(model_dir)}


def ppo_side(work: Path, engine_name: str) -> dict:
    from bench.ppo_throughput import prepare, tristage_side, trl_side

    model, prompts = prepare(work)
    if engine_name == "trl":
        return trl_side(work, model, prompts)
    return tristage_side(work, model, prompts, extra=[f"rollout_engine={engine_name}"])


def main() -> None:
    args, work = start(__doc__)
    sides = {f"generate-{engine}-{key}-{dtype}": (lambda e=engine, k=key, d=dtype: generation_side(work, e, k, d))
             for engine in ("hf", "vllm") for key, dtype in SETTINGS}
    sides.update({f"ppo-{name}": (lambda n=name: ppo_side(work, n)) for name in ("hf", "vllm", "trl")})
    if ran_one_side(args, sides):
        return
    result, table = {"goal": "generation >= 2x at ~30M parameters; PPO >= 1.5x TRL RLOO"}, []
    for key, dtype in SETTINGS:
        hf_name, vllm_name = f"generate-hf-{key}-{dtype}", f"generate-vllm-{key}-{dtype}"
        runs = interleaved("bench.rollout_engines", [hf_name, vllm_name], work, args.repeats)
        hf, vllm = [r["tokens_per_second"] for r in runs[hf_name]], [r["tokens_per_second"] for r in runs[vllm_name]]
        entry = {"parameters": runs[hf_name][0]["parameters"], "hf_tokens_per_second": spread(hf), "vllm_tokens_per_second": spread(vllm),
                 "vllm_over_hf": ratio(vllm, hf), "vllm_startup_seconds": spread([r["startup_seconds"] for r in runs[vllm_name]]),
                 "runs": runs}
        result[f"generation_{key}_{dtype}"] = entry
        table.append((f"generation tokens/s, {entry['parameters'] / 1e6:.1f}M params, {dtype}", f"{spread(hf)['median']:.0f}",
                      f"{spread(vllm)['median']:.0f}", fmt_ratio(entry["vllm_over_hf"])))
    runs = interleaved("bench.rollout_engines", ["ppo-hf", "ppo-vllm", "ppo-trl"], work, args.repeats)
    episodes = {name: [r["episodes_per_second"] for r in runs[f"ppo-{name}"]] for name in ("hf", "vllm", "trl")}
    result["ppo"] = {"episodes_per_second": {name: spread(values) for name, values in episodes.items()},
                     "vllm_over_hf": ratio(episodes["vllm"], episodes["hf"]), "vllm_over_trl_rloo": ratio(episodes["vllm"], episodes["trl"]),
                     "hf_over_trl_rloo": ratio(episodes["hf"], episodes["trl"]),
                     "rollout_share": {name: spread([r["rollout_share"] for r in runs[f"ppo-{name}"]]) for name in ("hf", "vllm")},
                     "runs": runs}
    table.append(("PPO episodes/s (d256)", f"{spread(episodes['hf'])['median']:.1f}", f"{spread(episodes['vllm'])['median']:.1f}",
                  fmt_ratio(result["ppo"]["vllm_over_hf"])))
    table.append(("PPO episodes/s, vllm engine vs TRL RLOO", f"TRL {spread(episodes['trl'])['median']:.1f}",
                  f"{spread(episodes['vllm'])['median']:.1f}", fmt_ratio(result["ppo"]["vllm_over_trl_rloo"])))
    write_result("rollout_engines", result)
    print_table("Rollout engines: vLLM vs transformers' generate (CPU)", table, ("", "hf", "vllm", "vllm / hf"))


if __name__ == "__main__":
    main()
