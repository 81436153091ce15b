"""PPO's keys (stage 3), with their checks: values when the config is parsed (``__post_init__``), the settings
that depend on the backbone and training keys in ``validate``, as TRL's config classes do. Defaults follow
lm-human-preferences / "The N implementation details of RLHF with PPO" unless noted."""
from __future__ import annotations

from dataclasses import dataclass, field

from rewards.sources import RewardSourceArguments, check_specs, is_model_source
from stages.common.config import BackboneArguments, DataArguments, ModelArguments, TrainArguments
from stages.common.errors import ConfigError
from stages.common.generation import SamplingArguments
from stages.common.loading import adapter_base_path
from stages.common.rollout import RolloutArguments, refuse_unsupported

from .advantages import ESTIMATORS, GROUP_ESTIMATORS
from .kl import KL_ESTIMATORS
from .losses import AGGREGATIONS

CRITIC_INITS = ("reward", "actor")
KL_PLACES = ("reward", "loss")
CRITIC_KEYS = {"critic_init": "reward", "critic_learning_rate": None, "vf_coef": 0.1, "clip_range_value": 0.2}  # gae's, with defaults


@dataclass
class PPOArguments:
    """Stage 3. ``max_steps`` counts PPO iterations (else ``num_train_epochs`` passes over the prompts);
    ``save_steps`` and ``logging_steps`` count iterations too; ``learning_rate`` is the actor's."""

    # ---- estimator
    advantage_estimator: str = field(default="gae", metadata={
        "help": "gae: PPO with a critic. Critic-free (no critic is built): grpo, (r - group mean) / group std; rloo, r - mean "
                "of the prompt's other samples; reinforce_pp, whitened returns of the KL-shaped rewards (REINFORCE++); "
                "reinforce_pp_baseline, the group mean subtracted first. Formulas in stages/ppo/advantages.py."})
    samples_per_prompt: int = field(default=1, metadata={
        "help": "n responses sampled per prompt (rollouts = prompts x n); grpo, rloo and reinforce_pp_baseline need n >= 2."})
    grpo_scale_by_std: bool = field(default=True, metadata={"help": "grpo: divide by the group's std; false = Dr. GRPO's unscaled advantage."})
    loss_aggregation: str = field(default="token_mean", metadata={
        "help": "How per-token policy (and KL) loss terms become one: token_mean (every token weighs the same), seq_mean_token_sum "
                "(Dr. GRPO: sum per sequence, mean over sequences), seq_mean_token_mean (GRPO's original, length-biased)."})
    dynamic_sampling: bool = field(default=False, metadata={
        "help": "DAPO: drop groups whose scores are all equal (no signal for a group baseline) and sample new prompts in their "
                "place, for at most dynamic_sampling_max_rounds generation rounds; groups still missing are filled with dropped "
                "ones. Needs samples_per_prompt >= 2."})
    dynamic_sampling_max_rounds: int = field(default=4, metadata={"help": "Generation rounds per iteration with dynamic_sampling, the first included."})
    # ---- roles
    reward_model: list[str] = field(default=None, metadata={
        "help": "Reward sources, summed with reward_weights: a reward-model directory (full or adapter), "
                "rule:NAME (rewards/rules.py), or an http(s):// URL (rewards/remote.py)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward source; None = all 1."})
    critic_init: str = field(default="reward", metadata={
        "help": "gae only. reward: the critic starts as the first reward model (its head predicts values); actor: from the SFT model "
                "with a new zero-initialized value head."})
    ref_model_name_or_path: str | None = field(default=None, metadata={"help": "Frozen reference policy; None = the SFT model."})
    shared_backbone: bool = field(default=False, metadata={
        "help": "lora/qlora only: actor, reference, critic and reward share one base model as adapters (one copy in memory)."})
    critic_learning_rate: float | None = field(default=None, metadata={"help": "gae only; None = learning_rate."})
    vf_coef: float = field(default=0.1, metadata={"help": "gae only. Weight of the value loss (shared backbone, where one optimizer trains both)."})
    # ---- rollout
    rollout_batch_size: int = field(default=64, metadata={
        "help": "Prompts per iteration over all processes; each is sampled samples_per_prompt times."})
    # ---- reward shaping
    reward_normalize: bool = field(default=True, metadata={"help": "(r - mean) / std with each reward model's reward_stats.json."})
    reward_clip: float = field(default=0.0, metadata={"help": "Clip scores to [-c, c] after normalization; 0 = off."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards over the rollout (keeping the mean)."})
    missing_eos_penalty: float = field(default=1.0, metadata={
        "help": "Subtracted from the score of a response that hit max_new_tokens without EOS; 0 = off."})
    # ---- KL control
    kl_in: str = field(default="reward", metadata={
        "help": "reward: -beta * KL in every token's reward (PPO, REINFORCE++); loss: beta * KL as a term of the policy loss, "
                "aggregated as loss_aggregation says (GRPO)."})
    kl_estimator: str = field(default="k1", metadata={
        "help": "k1 (log-ratio), k2 (1/2 log-ratio^2, >= 0) or k3 (>= 0, unbiased, low variance); kl.py."})
    init_kl_coef: float = field(default=0.05, metadata={"help": "beta, the KL coefficient (its start when adaptive)."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Ziegler et al. proportional controller towards kl_target."})
    kl_target: float = field(default=6.0, metadata={"help": "Target KL (nats per response) for adaptive_kl."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon (in rollouts) of the adaptive controller."})
    # ---- PPO update
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout; minibatch = per_device_train_batch_size x "
                                                         "gradient_accumulation_steps x processes."})
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = field(default=0.2, metadata={"help": "Policy ratio clip epsilon."})
    clip_range_value: float = field(default=0.2, metadata={"help": "gae only. Value clip around the rollout's values; 0 = unclipped."})
    whiten_advantages: bool | None = field(default=None, metadata={
        "help": "Whiten advantages over the rollout (all processes'); None = the estimator's own: yes for gae and reinforce_pp*, "
                "no for grpo and rloo (their group baseline is their normalisation)."})
    # ---- extras
    ptx_coef: float = field(default=0.0, metadata={"help": "InstructGPT ptx: weight of a language-model loss on ptx_dataset; 0 = off."})
    ptx_dataset: list[str] | None = field(default=None, metadata={"help": "SFT-format data for the ptx loss."})
    ema_decay: float = field(default=0.0, metadata={"help": "Keep an EMA of the actor (saved to output_dir/ema); 0 = off. E.g. 0.992."})
    disable_dropout: bool = field(default=True, metadata={"help": "Dropout off in every role, so rollout and update log-probs agree."})
    rollout_is_cap: float = field(default=0.0, metadata={
        "help": "rollout_engine vllm: weigh each token's policy loss by min(pi_old / pi_engine, cap), truncated importance "
                "sampling for the gap between the engine's numbers and the training model's; 0 = off."})

    def __post_init__(self):
        for key, allowed in (("advantage_estimator", ESTIMATORS), ("critic_init", CRITIC_INITS), ("kl_estimator", tuple(KL_ESTIMATORS)),
                             ("kl_in", KL_PLACES), ("loss_aggregation", AGGREGATIONS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"must be one of {', '.join(allowed)}, not {getattr(self, key)!r}", key=key)
        for key in ("samples_per_prompt", "dynamic_sampling_max_rounds"):
            if getattr(self, key) < 1:
                raise ConfigError("must be >= 1", key=key)
        if self.advantage_estimator in GROUP_ESTIMATORS and self.samples_per_prompt < 2:
            raise ConfigError(f"{self.advantage_estimator} compares the samples of a prompt: it needs >= 2", key="samples_per_prompt")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ConfigError("drops groups of samples whose scores are equal: it needs samples_per_prompt >= 2", key="dynamic_sampling")
        if not self.grpo_scale_by_std and self.advantage_estimator != "grpo":
            raise ConfigError("is grpo's; the advantage_estimator is " + self.advantage_estimator, key="grpo_scale_by_std")
        if not self.uses_critic:
            for key, default in CRITIC_KEYS.items():
                if getattr(self, key) != default:
                    raise ConfigError(f"is a critic's setting; advantage_estimator {self.advantage_estimator} builds no critic", key=key)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("must be in [0, 1)", key="ema_decay")
        if self.ptx_coef > 0 and not self.ptx_dataset:
            raise ConfigError("ptx_coef > 0 needs ptx_dataset", key="ptx_dataset")
        for key in ("rollout_batch_size", "ppo_epochs", "kl_horizon"):
            if getattr(self, key) < 1:
                raise ConfigError("must be >= 1", key=key)
        if self.kl_target <= 0:
            raise ConfigError("must be > 0", key="kl_target")
        if self.rollout_is_cap < 0:
            raise ConfigError("must be >= 0 (0 = off)", key="rollout_is_cap")

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def whitens_advantages(self) -> bool:
        if self.whiten_advantages is not None:
            return self.whiten_advantages
        return self.advantage_estimator in ("gae", "reinforce_pp", "reinforce_pp_baseline")

    def reward_models(self) -> list[str]:
        """The reward sources that are reward-model directories (not rules or servers)."""
        return [s for s in self.reward_model or [] if is_model_source(s)]

    def first_reward_model(self) -> str | None:
        return next(iter(self.reward_models()), None)

    def validate(self, backbone: BackboneArguments, sampling: SamplingArguments, train_args, rollout: RolloutArguments,
                 model_path: str) -> list[str]:
        """The checks that involve other keys or the disk, before anything loads. In a dry run a reward-model directory
        that does not exist yet (the rm stage has not run) is returned instead of refused."""
        if self.rollout_is_cap > 0 and rollout.rollout_engine != "vllm":
            raise ConfigError("weighs the gap between a vLLM engine's log-probs and the actor's; the hf engine samples with "
                              "the actor itself (use it with rollout_engine: vllm)", key="rollout_is_cap")
        refuse_unsupported(rollout, backbone.finetuning_type)
        if rollout.rollout_engine == "vllm" and not train_args.dry_run:
            from stages.common.rollout.vllm_engine import check_vllm_can_load

            check_vllm_can_load(adapter_base_path(model_path) or model_path)
        if sampling.temperature <= 0:
            raise ConfigError("must be > 0 for PPO: rollouts are sampled", key="temperature")
        if self.shared_backbone and backbone.finetuning_type not in ("lora", "qlora"):
            raise ConfigError("the shared backbone holds the roles as adapters: use finetuning_type lora or qlora", key="shared_backbone")
        if self.shared_backbone and train_args.deepspeed:
            raise ConfigError("the shared backbone is the single-device memory saver; under DeepSpeed use separate models "
                              "(shared_backbone: false)", key="shared_backbone")
        not_yet = check_specs(self.reward_model, key="reward_model", allow_missing=bool(train_args.dry_run))
        if self.uses_critic and self.critic_init == "reward" and self.first_reward_model() is None:
            raise ConfigError("the critic starts from a reward model, but reward_model names none; set critic_init: actor",
                              key="critic_init")
        return not_yet


ARGUMENTS = (ModelArguments, DataArguments, BackboneArguments, PPOArguments, SamplingArguments, RolloutArguments, RewardSourceArguments,
             TrainArguments)
