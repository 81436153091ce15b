"""The eval stage's keys (``launch/run_stage.sh eval``): which models, which prompts, which judges, how to sample.
Value checks run when the config is parsed; ``validate`` checks what exists on disk, when eval starts."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rewards.sources import RewardSourceArguments, check_specs
from stages.common.config import DataArguments
from stages.common.config_files import DEFAULT_EVAL_OUTPUT_DIR
from stages.common.errors import ConfigError
from stages.common.generation import SamplingArguments
from stages.common.loading import adapter_base_path, check_device_and_dtype
from stages.common.rollout import RolloutArguments, refuse_unsupported

from .references import TOKENIZERS

PROMPT_LEARNING = ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING")


@dataclass
class EvalArguments:
    """Compare models on held-out prompts with the same sampling settings and seeds (stages/eval)."""

    models: list[str] = field(default=None, metadata={
        "help": "Model directories (full, adapter, adapter stack or exported): one is scored, two or more are also compared."})
    model_names: list[str] | None = field(default=None, metadata={"help": "Display names, one per model; default: directory names."})
    reference_model: str | None = field(default=None, metadata={"help": "KL is measured against this model; default: the first."})
    judges: list[str] = field(default_factory=lambda: ["rule:gold_judge"], metadata={
        "help": "Reward-model directories, rule:NAME, or http(s) URLs; each scores every response."})
    judge_normalize: bool = field(default=False, metadata={"help": "Report reward-model scores normalized by reward_stats.json."})
    judge_batch_size: int = field(default=16, metadata={"help": "Responses a reward-model judge scores per forward."})
    samples_per_prompt: int = field(default=4, metadata={"help": "Responses per prompt and model (paired across models by index)."})
    batch_size: int = field(default=32, metadata={"help": "Rows per generate call and per log-prob pass."})
    seed: int = 0
    use_model_generation_config: bool = field(default=False, metadata={
        "help": "Let each model's generation_config.json fill what the sampling keys do not set (repetition penalty, n-gram "
                "blocking, min_p, ...). Off: exactly the sampling keys, the same for every model. KL to the reference still "
                "uses logits / temperature."})
    device: str = field(default="auto", metadata={"help": "auto (this machine's GPU if it has one, else the CPU), cpu, cuda or cuda:N."})
    dtype: str = field(default="auto", metadata={
        "help": "The models' and judges' weights: auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16."})
    reference_tokenize: str = field(default="auto", metadata={
        "help": "BLEU / ROUGE-L against the prompts' reference answers (when they carry one): auto (zh, per character, when a "
                "reference holds Chinese, else 13a), 13a or zh."})
    bootstrap_samples: int = field(default=2000, metadata={"help": "Bootstrap rounds for every confidence interval."})
    num_examples: int = field(default=3, metadata={"help": "Side-by-side examples in the report."})
    export_pairs: str | None = field(default=None, metadata={
        "help": "Write every (prompt, response A, response B) pair, A/B order randomized, as jsonl for collect."})
    output_dir: str = field(default=DEFAULT_EVAL_OUTPUT_DIR, metadata={"help": "eval_report.json, eval_report.png, responses.jsonl go here."})

    def __post_init__(self):
        if self.model_names and self.models and len(self.model_names) != len(self.models):
            raise ConfigError(f"{len(self.model_names)} name(s) for {len(self.models)} model(s)", key="model_names")
        for key in ("samples_per_prompt", "batch_size", "judge_batch_size", "bootstrap_samples"):
            if getattr(self, key) < 1:
                raise ConfigError("must be >= 1", key=key)
        check_device_and_dtype(self.device, self.dtype)
        if self.reference_tokenize not in TOKENIZERS:
            raise ConfigError(f"must be one of {', '.join(TOKENIZERS)}, not {self.reference_tokenize!r}", key="reference_tokenize")

    def validate(self, rollout: RolloutArguments) -> None:
        """What must exist when eval starts (not when a pipeline parses the config, before the models are trained)."""
        if not self.models:
            raise ConfigError("give one or more model directories to evaluate (two or more to compare them)", key="models")
        for path in self.models + ([self.reference_model] if self.reference_model else []):
            if not Path(path).is_dir():
                raise ConfigError(f"{path!r} is not a model directory", key="models" if path in self.models else "reference_model")
        check_specs(self.judges, key="judges")
        if rollout.rollout_engine == "vllm":
            from stages.common.rollout.vllm_engine import check_vllm_can_load

            if self.use_model_generation_config:
                raise ConfigError("a model's generation_config.json reaches transformers' generate only; with rollout_engine: "
                                  "vllm use the sampling keys (or rollout_engine: hf)", key="use_model_generation_config")
            refuse_unsupported(rollout)
            for path in self.models:
                adapter = Path(path) / "adapter_config.json"
                if adapter.is_file() and json.loads(adapter.read_text()).get("peft_type") in PROMPT_LEARNING:
                    raise ConfigError(f"{path} is a P-tuning adapter, whose virtual tokens a vLLM engine has no place for; use "
                                      "rollout_engine: hf", key="rollout_engine")
                check_vllm_can_load(adapter_base_path(path) or path)


ARGUMENTS = (DataArguments, EvalArguments, SamplingArguments, RolloutArguments, RewardSourceArguments)
