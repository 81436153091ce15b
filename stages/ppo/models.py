"""The four PPO roles (actor, reference, critic, reward) and the two ways to hold them.

Separate models (any backbone, and ZeRO-3): the actor and the critic are training engines of their own,
the reference and the reward models are frozen models (ZeRO inference engines under ZeRO-3).

Shared backbone (lora/qlora): one base model carries every role as adapters:
    actor     = base + SFT adapter (frozen, when SFT trained one) + "ppo" adapter (trains)
    reference = base + SFT adapter                       (the PPO adapter switched off)
    critic    = base + "critic" adapter + value head      (both train; started from the RM adapter when it has one)
    reward    = base + "reward" adapter + score head      (frozen; the RM adapter and its head)
One engine trains the ppo and critic adapters and the value head with one optimizer.

Both expose the same calls to the trainer: ``generate``, ``actor_logits``, ``ref_logits``, ``values``,
``backward_actor``, ``backward_critic``, ``optimizer_step``, ``engines`` and ``save``.
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rewards.model import RewardModel, load_reward_model, score_head
from rewards.sources import build_reward, is_model_source
from stages.common.backbone import (POLICY_STACK_FILE, adapter_base_path, apply_backbone, attach_adapters, load_pretrained,
                                    peft_config, policy_adapters, prepare_for_training, quantization_config)
from stages.common.engine import TrainingEngine, frozen_model
from stages.common.errors import ConfigError
from stages.rm.train import SCORE_HEAD

PPO_ADAPTER, CRITIC_ADAPTER, REWARD_ADAPTER = "ppo", "critic", "reward"


def disable_dropout(model: nn.Module) -> None:
    """PPO compares log-probs of the same tokens at rollout and update time; dropout would make them differ."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def mark_trainable(model: nn.Module, adapter_names: list[str]) -> None:
    """peft's set_adapter makes every active adapter trainable; we decide: only these adapters."""
    for name, param in model.named_parameters():
        parts = name.split(".")
        param.requires_grad_(any(a in parts for a in adapter_names))


def _with_path(model_args, path: str):
    return dataclasses.replace(model_args, model_name_or_path=path)


def first_model_source(ppo_args) -> str | None:
    return next((s for s in ppo_args.reward_model or [] if is_model_source(s)), None)


def check_ppo_args(ppo_args, backbone, train_args) -> list[str]:
    """Raises ConfigError for a bad PPO setting. In a dry run a reward model directory that does not exist yet
    (the rm stage has not run) is returned instead of refused."""
    not_yet = []
    if ppo_args.shared_backbone and backbone.finetuning_type not in ("lora", "qlora"):
        raise ConfigError("the shared backbone holds the roles as adapters: use finetuning_type lora or qlora", key="shared_backbone")
    if ppo_args.shared_backbone and train_args.deepspeed:
        raise ConfigError("the shared backbone is the single-device memory saver; under DeepSpeed use separate models "
                          "(shared_backbone: false)", key="shared_backbone")
    from rewards.sources import RuleSource

    for spec in ppo_args.reward_model or []:
        if spec.startswith("rule:"):
            RuleSource(spec)  # raises for an unknown rule
        elif is_model_source(spec) and not Path(spec).is_dir() and train_args.dry_run:
            not_yet.append(spec)
        elif is_model_source(spec) and not Path(spec).is_dir():
            raise ConfigError(f"{spec!r} is neither a reward model directory, rule:NAME nor an http(s) URL", key="reward_model")
    if not ppo_args.reward_model:
        raise ConfigError("no reward given: a reward model directory, rule:NAME or an http(s) URL", key="reward_model")
    if ppo_args.critic_init not in ("reward", "actor"):
        raise ConfigError("must be reward or actor", key="critic_init")
    if ppo_args.critic_init == "reward" and first_model_source(ppo_args) is None:
        raise ConfigError("the critic starts from a reward model, but reward_model names none; set critic_init: actor", key="critic_init")
    if ppo_args.kl_estimator not in ("k1", "k3"):
        raise ConfigError("must be k1 or k3", key="kl_estimator")
    if ppo_args.temperature <= 0:
        raise ConfigError("must be > 0 for PPO (sampling)", key="temperature")
    if ppo_args.ptx_coef > 0 and not ppo_args.ptx_dataset:
        raise ConfigError("ptx_coef > 0 needs ptx_dataset", key="ptx_dataset")
    if not 0.0 <= ppo_args.ema_decay < 1.0:
        raise ConfigError("must be in [0, 1)", key="ema_decay")
    return not_yet


# ------------------------------------------------------------------------------------ loading pieces
def load_actor_model(model_args, backbone, train_args):
    """The SFT model as the starting policy: full weights train, or a new PPO adapter trains on top of it
    (stacked over the SFT adapter when SFT trained an adapter)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    path = model_args.model_name_or_path
    # a single SFT adapter is "sft" here (peft saves only non-default names in sub-directories of a stack)
    sft_adapters = [("sft" if name == "default" else name, directory) for name, directory in policy_adapters(path)]
    model = load_pretrained(AutoModelForCausalLM, _with_path(model_args, adapter_base_path(path) or path), backbone, train_args)
    if backbone.finetuning_type == "full":
        if sft_adapters:
            model = attach_adapters(model, sft_adapters).merge_and_unload()
        return apply_backbone(model, backbone, train_args), []
    model = prepare_for_training(model, backbone, train_args)
    config = peft_config(backbone, "CAUSAL_LM")
    if sft_adapters:
        model = attach_adapters(model, sft_adapters)
        model.add_adapter(PPO_ADAPTER, config)
    else:
        model = get_peft_model(model, config, adapter_name=PPO_ADAPTER)
    names = [name for name, _ in sft_adapters]
    model.base_model.set_adapter(names + [PPO_ADAPTER])
    mark_trainable(model, [PPO_ADAPTER])
    return model, names


def load_critic_model(ppo_args, model_args, backbone, train_args, pad_token_id: int) -> RewardModel:
    """A value model: the reward model by default (its head already scores responses), or the SFT model with
    a zero-initialized value head. Trains with the stage's backbone mode."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    path = first_model_source(ppo_args) if ppo_args.critic_init == "reward" else model_args.model_name_or_path
    adapters = policy_adapters(path)
    model = load_pretrained(AutoModelForSequenceClassification, _with_path(model_args, adapter_base_path(path) or path), backbone,
                            train_args, num_labels=1)
    model.config.pad_token_id = pad_token_id
    if ppo_args.critic_init == "actor":
        zero_head(score_head(model))
    if backbone.finetuning_type == "full":
        if adapters:
            model = attach_adapters(model, adapters).merge_and_unload()
        return RewardModel(apply_backbone(model, backbone, train_args, task_type="SEQ_CLS", head_modules=SCORE_HEAD))
    if ppo_args.critic_init == "reward" and len(adapters) == 1:  # keep training the RM's own adapter and head
        model = PeftModel.from_pretrained(prepare_for_training(model, backbone, train_args), adapters[0][1], is_trainable=True)
        return RewardModel(model)
    if adapters:
        model = attach_adapters(prepare_for_training(model, backbone, train_args), adapters)
        model.add_adapter(CRITIC_ADAPTER, peft_config(backbone, "SEQ_CLS", SCORE_HEAD))
        model.base_model.set_adapter([name for name, _ in adapters] + [CRITIC_ADAPTER])
        mark_trainable(model, [CRITIC_ADAPTER])
        return RewardModel(model)
    return RewardModel(apply_backbone(model, backbone, train_args, task_type="SEQ_CLS", head_modules=SCORE_HEAD))


def zero_head(head: nn.Module) -> None:
    import deepspeed

    params = list(head.parameters())
    context = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if hasattr(params[0], "ds_id") else _nothing()
    with context, torch.no_grad():
        for param in params:
            param.zero_()


@contextmanager
def _nothing():
    yield


def actor_quantization(backbone, train_args):
    return quantization_config(backbone, train_args) if backbone.finetuning_type == "qlora" else None


def critic_train_args(train_args, ppo_args):
    if ppo_args.critic_learning_rate is None:
        return train_args
    return dataclasses.replace(train_args, learning_rate=ppo_args.critic_learning_rate)


# ------------------------------------------------------------------------------------ separate models
class SeparateRoles:
    def __init__(self, ppo_args, model_args, backbone, train_args, tokenizer, steps: int, dist, ds_config):
        from stages.common.backbone import load_policy

        actor, self.sft_adapters = load_actor_model(model_args, backbone, train_args)
        critic = load_critic_model(ppo_args, model_args, backbone, train_args, tokenizer.pad_token_id)
        ref_path = ppo_args.ref_model_name_or_path or model_args.model_name_or_path
        ref = load_policy(ref_path, quantization=actor_quantization(backbone, train_args))
        reward_models = {spec: frozen_model(load_reward_model(spec), ds_config, dist)
                         for spec in ppo_args.reward_model if is_model_source(spec)}
        if ppo_args.disable_dropout:
            for model in (actor, critic, ref):
                disable_dropout(model)
        self.actor = TrainingEngine(actor, train_args, steps, dist, ds_config)
        critic_config = json.loads(json.dumps(ds_config)) if ds_config else None
        self.critic = TrainingEngine(critic, critic_train_args(train_args, ppo_args), steps, dist, critic_config)
        self.ref = frozen_model(ref, ds_config, dist)
        self.reward = build_reward(ppo_args.reward_model, ppo_args.reward_weights, ppo_args.reward_normalize,
                                   batch_size=train_args.per_device_eval_batch_size, models=reward_models)
        self.base_path = adapter_base_path(model_args.model_name_or_path) or model_args.model_name_or_path
        self.models_in_memory = 3 + len(reward_models)

    @property
    def engines(self) -> dict[str, TrainingEngine]:
        return {"actor": self.actor, "critic": self.critic}

    @contextmanager
    def generation_model(self):
        """The actor with its ZeRO-3 shards gathered once for the whole rollout (not once per token)."""
        self.actor.train(False)
        with self.actor.generation_model() as model:
            yield model

    def actor_logits(self, inputs: dict) -> torch.Tensor:
        return self.actor.forward_model(**inputs, use_cache=False).logits

    @torch.no_grad()
    def ref_logits(self, inputs: dict) -> torch.Tensor:
        return self.ref(**inputs, use_cache=False).logits

    def values(self, inputs: dict) -> torch.Tensor:
        return self.critic.forward_model(inputs["input_ids"], inputs["attention_mask"], True)

    def train(self, mode: bool) -> None:
        self.actor.train(mode)
        self.critic.train(mode)

    def backward_actor(self, loss: torch.Tensor) -> None:
        self.actor.backward(loss)

    def backward_critic(self, loss: torch.Tensor) -> None:
        self.critic.backward(loss)

    def optimizer_step(self) -> dict[str, float]:
        norms = {"actor_grad_norm": self.actor.optimizer_step(), "critic_grad_norm": self.critic.optimizer_step()}
        return {k: v for k, v in norms.items() if v is not None}

    def trainable_actor_parameters(self):
        return [p for p in self.actor.module.parameters() if p.requires_grad]

    def save_actor(self, directory: Path, tokenizer, state_dict: dict | None = None) -> None:
        save_policy(self.actor.module, directory, tokenizer, self.sft_adapters, self.base_path, state_dict)

    def save_critic(self, directory: Path, tokenizer, state_dict: dict | None = None) -> None:
        self.critic.module.save_pretrained(directory, state_dict=state_dict)
        tokenizer.save_pretrained(directory)


def save_policy(model: nn.Module, directory: Path, tokenizer, sft_adapters: list[str], base_path: str,
                state_dict: dict | None = None) -> None:
    """A full model, or the adapter stack (SFT adapter(s) + PPO adapter) with tristage_policy.json naming the base."""
    directory = Path(directory)
    if hasattr(model, "peft_config"):
        names = sft_adapters + [PPO_ADAPTER]
        model.save_pretrained(directory, selected_adapters=names, state_dict=state_dict)
        (directory / POLICY_STACK_FILE).write_text(json.dumps({"base_model_name_or_path": base_path, "adapters": names}, indent=2))
    else:
        model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)


# ------------------------------------------------------------------------------------ shared backbone
class SharedBackbone(nn.Module):
    """One base model with the actor, critic and reward adapters and the two scalar heads."""

    def __init__(self, peft_model: nn.Module, sft_adapters: list[str], value_head: nn.Module, reward_head: nn.Module | None):
        super().__init__()
        self.peft_model, self.sft_adapters = peft_model, sft_adapters
        self.value_head, self.reward_head = value_head, reward_head
        self.config = peft_model.config

    def use(self, role: str) -> None:
        adapters = {"actor": self.sft_adapters + [PPO_ADAPTER], "ref": self.sft_adapters, "critic": [CRITIC_ADAPTER],
                    "reward": [REWARD_ADAPTER]}[role]
        lora_model = self.peft_model.base_model
        if adapters:
            lora_model.enable_adapter_layers()
            lora_model.set_adapter(adapters)
        else:
            lora_model.disable_adapter_layers()  # the reference of a full SFT model is the bare base
        mark_trainable(self.peft_model, [PPO_ADAPTER, CRITIC_ADAPTER])

    def decoder(self) -> nn.Module:
        causal_lm = self.peft_model.get_base_model()
        return getattr(causal_lm, causal_lm.base_model_prefix)

    def forward(self, role: str, input_ids, attention_mask, position_ids=None, **_):
        self.use(role)
        if role in ("actor", "ref"):
            return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
        from stages.common.masks import position_ids_from_mask

        hidden = self.decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        head = self.value_head if role == "critic" else self.reward_head
        return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


class SharedRewardView(nn.Module):
    """The shared backbone's reward role, shaped like a RewardModel for the scorer."""

    def __init__(self, shared: SharedBackbone):
        super().__init__()
        self.shared = shared

    def forward(self, input_ids, attention_mask):
        from stages.common.masks import last_token_index

        scores = self.shared("reward", input_ids, attention_mask)
        return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


def split_reward_adapter(rm_dir: str) -> tuple[object, dict, dict]:
    """An RM adapter as (LoRA config for a causal-LM host, LoRA weights, score-head weights)."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(rm_dir)
    config.modules_to_save, config.task_type = None, "CAUSAL_LM"
    weights = load_file(str(Path(rm_dir) / "adapter_model.safetensors"))
    head = {k.rsplit(".", 1)[-1]: v for k, v in weights.items() if ".score." in k}
    lora = {k: v for k, v in weights.items() if ".score." not in k}
    return config, lora, head


class SharedRoles(SeparateRoles):
    def __init__(self, ppo_args, model_args, backbone, train_args, tokenizer, steps: int, dist, ds_config):
        from peft import set_peft_model_state_dict

        peft_model, self.sft_adapters = load_actor_model(model_args, backbone, train_args)
        base_path = adapter_base_path(model_args.model_name_or_path) or model_args.model_name_or_path
        hidden = peft_model.config.get_text_config().hidden_size
        value_head = nn.Linear(hidden, 1, bias=False)
        reward_head = None
        rm_dir = first_model_source(ppo_args)
        rm_shares_base = rm_dir is not None and adapter_base_path(rm_dir) is not None and \
            Path(adapter_base_path(rm_dir)).resolve() == Path(base_path).resolve() and len(policy_adapters(rm_dir)) == 1
        if rm_shares_base:
            config, lora, head = split_reward_adapter(rm_dir)
            peft_model.add_adapter(REWARD_ADAPTER, config)
            set_peft_model_state_dict(peft_model, lora, adapter_name=REWARD_ADAPTER)
            reward_head = nn.Linear(hidden, 1, bias="bias" in head)
            reward_head.load_state_dict(head)
            reward_head.requires_grad_(False)
        if rm_shares_base and ppo_args.critic_init == "reward":
            config, lora, head = split_reward_adapter(rm_dir)
            peft_model.add_adapter(CRITIC_ADAPTER, config)
            set_peft_model_state_dict(peft_model, lora, adapter_name=CRITIC_ADAPTER)
            value_head = nn.Linear(hidden, 1, bias="bias" in head)
            value_head.load_state_dict(head)
        else:  # a fresh critic adapter and a zero value head (values start at 0)
            peft_model.add_adapter(CRITIC_ADAPTER, peft_config(backbone, "CAUSAL_LM"))
            nn.init.zeros_(value_head.weight)
        if ppo_args.disable_dropout:
            disable_dropout(peft_model)
        self.shared = SharedBackbone(peft_model, self.sft_adapters, value_head, reward_head)
        self.shared.use("actor")
        self.actor = TrainingEngine(self.shared, train_args, steps, dist, None)
        self.critic = None
        reward_models = {rm_dir: SharedRewardView(self.shared)} if rm_shares_base else {}
        separate = {s: frozen_model(load_reward_model(s), None, dist)
                    for s in ppo_args.reward_model if is_model_source(s) and s not in reward_models}
        self.reward = build_reward(ppo_args.reward_model, ppo_args.reward_weights, ppo_args.reward_normalize,
                                   batch_size=train_args.per_device_eval_batch_size, models={**reward_models, **separate},
                                   tokenizer=tokenizer if rm_shares_base else None)
        self.base_path = base_path
        self.models_in_memory = 1 + len(separate)
        self.vf_coef = ppo_args.vf_coef

    @property
    def engines(self) -> dict[str, TrainingEngine]:
        return {"actor": self.actor}

    @contextmanager
    def generation_model(self):
        self.shared.eval()
        self.shared.use("actor")
        yield self.shared.peft_model

    def actor_logits(self, inputs: dict) -> torch.Tensor:
        return self.shared("actor", **inputs)

    @torch.no_grad()
    def ref_logits(self, inputs: dict) -> torch.Tensor:
        return self.shared("ref", **inputs)

    def values(self, inputs: dict) -> torch.Tensor:
        return self.shared("critic", inputs["input_ids"], inputs["attention_mask"])

    def train(self, mode: bool) -> None:
        self.actor.train(mode)

    def backward_critic(self, loss: torch.Tensor) -> None:
        self.actor.backward(self.vf_coef * loss)  # right after the critic forward: adapters still set for it

    def optimizer_step(self) -> dict[str, float]:
        norm = self.actor.optimizer_step()
        return {"grad_norm": norm} if norm is not None else {}

    def trainable_actor_parameters(self):
        return [p for n, p in self.shared.named_parameters() if f".{PPO_ADAPTER}." in n]

    def save_actor(self, directory: Path, tokenizer, state_dict: dict | None = None) -> None:
        self.shared.use("actor")
        save_policy(self.shared.peft_model, directory, tokenizer, self.sft_adapters, self.base_path)

    def save_critic(self, directory: Path, tokenizer, state_dict: dict | None = None) -> None:
        directory = Path(directory)
        self.shared.peft_model.save_pretrained(directory, selected_adapters=[CRITIC_ADAPTER])
        torch.save(self.shared.value_head.state_dict(), directory / "value_head.pt")


def build_roles(ppo_args, model_args, backbone, train_args, tokenizer, steps: int, dist, ds_config):
    cls = SharedRoles if ppo_args.shared_backbone else SeparateRoles
    return cls(ppo_args, model_args, backbone, train_args, tokenizer, steps, dist, ds_config)
