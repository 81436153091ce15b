"""PPO's four roles (actor, reference, critic, reward) and the two ways to hold them, behind one protocol.

``SeparateRoles`` (any backbone, and ZeRO-3): the actor and the critic are training engines of their own, the
reference and the reward models are frozen models (ZeRO inference engines under ZeRO-3).

The critic-free estimators (grpo, rloo, reinforce_pp*) build no critic in either holder: ``critic`` is None and
``has_critic`` False.

``SharedRoles`` (lora/qlora): one base model carries every role as adapters (``role_models.SharedBackbone``):
    actor     = base + SFT adapter (frozen, when SFT trained one) + "ppo" adapter (trains)
    reference = base + SFT adapter                       (the PPO adapter switched off)
    critic    = base + "critic" adapter + value head      (both train; started from the RM adapter when it has one)
    reward    = base + "reward" adapter + score head      (frozen; the RM adapter and its head)
One engine trains the ppo and critic adapters and the value head with one optimizer.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import ContextManager, Iterator, Protocol

import torch
from torch import nn

from rewards.model import load_reward_model
from rewards.sources import Reward, build_reward, is_model_source
from stages.common.backbone import compute_dtype, peft_config
from stages.common.engine import TrainingEngine, frozen_model, zero_stage
from stages.common.loading import adapter_base_path, load_policy, policy_adapters
from stages.common.policy import save_policy
from stages.common.rollout.weights import policy_weights

from .role_models import (CRITIC_ADAPTER, PPO_ADAPTER, REWARD_ADAPTER, SharedBackbone, SharedRewardView, actor_quantization,
                          critic_train_args, disable_dropout, load_actor_model, load_critic_model, split_reward_adapter)


class Roles(Protocol):
    """What one PPO iteration needs from the roles, however they are held."""

    actor: TrainingEngine  # its optimizer trains the policy (and, with the shared backbone, the critic too)
    critic: TrainingEngine | None  # None when the actor's engine trains the critic, or when there is no critic
    has_critic: bool  # False for the critic-free estimators: values() is not called, nothing is saved under critic/
    reward: Reward
    models_in_memory: int

    @property
    def engines(self) -> dict[str, TrainingEngine]:
        """The engines whose state a checkpoint holds, by name."""

    def generation_model(self) -> ContextManager[nn.Module]:
        """The policy, ready for ``generate``, inside the block (under the training precision's autocast)."""

    def policy_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The actor's weights as a checkpoint names them, streamed (for a vLLM rollout engine; rollout/weights.py)."""

    def actor_logits(self, inputs: dict, keep: int = 0) -> torch.Tensor:
        """The actor's logits at the last ``keep`` positions (0: all): PPO needs only the response's, and a
        (rows x length x vocabulary) tensor is the largest one it makes."""

    def ref_logits(self, inputs: dict, keep: int = 0) -> torch.Tensor: ...

    def values(self, inputs: dict) -> torch.Tensor:
        """The critic's value at every position of the rows."""

    def train(self, mode: bool) -> None: ...

    def backward_actor(self, loss: torch.Tensor) -> None: ...

    def backward_critic(self, loss: torch.Tensor) -> None: ...

    def optimizer_step(self) -> dict[str, float]:
        """Step every optimizer; returns the gradient norms that were finite."""

    def trainable_actor_parameters(self) -> list[nn.Parameter]: ...

    def save_actor(self, directory: Path, tokenizer, state_dict: dict | None = None) -> None: ...

    def save_critic(self, directory: Path, tokenizer, state_dict: dict | None = None) -> None: ...


class SeparateRoles:
    """Four models (or more, with several reward models): the general case, and the only one under DeepSpeed."""

    def __init__(self, ppo_args, model_args, backbone, train_args, tokenizer, steps: int, dist, ds_config, reward_settings):
        actor, self.sft_adapters = load_actor_model(model_args, backbone, train_args)
        self.has_critic = ppo_args.uses_critic
        critic = load_critic_model(ppo_args, model_args, backbone, train_args, tokenizer.pad_token_id) if self.has_critic else None
        ref_path = ppo_args.ref_model_name_or_path or model_args.model_name_or_path
        # frozen roles in the compute dtype (what a DeepSpeed bf16 actor computes in, so KL is 0 at step 0), straight
        # onto this process's device unless ZeRO-3 partitions them while they load
        frozen = {"dtype": compute_dtype(train_args), "device": None if zero_stage(ds_config) == 3 else dist.device}
        ref = load_policy(ref_path, quantization=actor_quantization(backbone, train_args), **frozen)
        reward_models = {spec: frozen_model(load_reward_model(spec, **frozen), ds_config, dist)
                         for spec in ppo_args.reward_model if is_model_source(spec)}
        if ppo_args.disable_dropout:
            for model in (actor, critic, ref):
                if model is not None:
                    disable_dropout(model)
        self.actor = TrainingEngine(actor, train_args, steps, dist, ds_config)
        critic_config = json.loads(json.dumps(ds_config)) if ds_config else None
        self.critic = TrainingEngine(critic, critic_train_args(train_args, ppo_args), steps, dist, critic_config) \
            if self.has_critic else None
        self.ref = frozen_model(ref, ds_config, dist)
        self.reward = build_reward(ppo_args.reward_model, ppo_args.reward_weights, ppo_args.reward_normalize,
                                   batch_size=train_args.per_device_eval_batch_size, settings=reward_settings, models=reward_models)
        self.base_path = adapter_base_path(model_args.model_name_or_path) or model_args.model_name_or_path
        self.models_in_memory = 2 + self.has_critic + len(reward_models)

    @property
    def engines(self) -> dict[str, TrainingEngine]:
        return {"actor": self.actor, "critic": self.critic} if self.has_critic else {"actor": self.actor}

    @contextmanager
    def generation_model(self):
        """The actor with its ZeRO-3 shards gathered once for the whole rollout (not once per token)."""
        self.actor.train(False)
        with self.actor.generation_model() as model, self.actor.forward_context():
            yield model

    def policy_weights(self):
        return policy_weights(self.actor.module, self.actor.gatherer())

    def actor_logits(self, inputs: dict, keep: int = 0) -> torch.Tensor:
        with self.actor.forward_context():
            return self.actor.forward_model(**inputs, use_cache=False, logits_to_keep=keep).logits

    @torch.no_grad()
    def ref_logits(self, inputs: dict, keep: int = 0) -> torch.Tensor:
        with self.actor.forward_context():
            return self.ref(**inputs, use_cache=False, logits_to_keep=keep).logits

    def values(self, inputs: dict) -> torch.Tensor:
        with self.critic.forward_context():
            return self.critic.forward_model(inputs["input_ids"], inputs["attention_mask"], True)

    def train(self, mode: bool) -> None:
        for engine in self.engines.values():
            engine.train(mode)

    def backward_actor(self, loss: torch.Tensor) -> None:
        self.actor.backward(loss)

    def backward_critic(self, loss: torch.Tensor) -> None:
        self.critic.backward(loss)

    def optimizer_step(self) -> dict[str, float]:
        norms = {f"{name}_grad_norm": engine.optimizer_step() for name, engine in self.engines.items()}
        return {k: v for k, v in norms.items() if v is not None}

    def trainable_actor_parameters(self):
        return [p for p in self.actor.module.parameters() if p.requires_grad]

    def save_actor(self, directory: Path, tokenizer, state_dict: dict | None = None) -> None:
        save_policy(self.actor.module, directory, tokenizer, self.sft_adapters, self.base_path, PPO_ADAPTER, state_dict)

    def save_critic(self, directory: Path, tokenizer, state_dict: dict | None = None) -> None:
        self.critic.module.save_pretrained(directory, state_dict=state_dict)
        tokenizer.save_pretrained(directory)


class SharedRoles:
    """One base model for every role (lora/qlora, one device): the memory saver."""

    def __init__(self, ppo_args, model_args, backbone, train_args, tokenizer, steps: int, dist, ds_config, reward_settings):
        from peft import set_peft_model_state_dict

        peft_model, self.sft_adapters = load_actor_model(model_args, backbone, train_args)
        base_path = adapter_base_path(model_args.model_name_or_path) or model_args.model_name_or_path
        hidden = peft_model.config.get_text_config().hidden_size
        value_head = nn.Linear(hidden, 1, bias=False)
        reward_head = None
        rm_dir = ppo_args.first_reward_model()
        rm_shares_base = rm_dir is not None and adapter_base_path(rm_dir) is not None and \
            Path(adapter_base_path(rm_dir)).resolve() == Path(base_path).resolve() and len(policy_adapters(rm_dir)) == 1
        if rm_shares_base:
            config, lora, head = split_reward_adapter(rm_dir)
            peft_model.add_adapter(REWARD_ADAPTER, config)
            set_peft_model_state_dict(peft_model, lora, adapter_name=REWARD_ADAPTER)
            reward_head = nn.Linear(hidden, 1, bias="bias" in head)
            reward_head.load_state_dict(head)
            reward_head.requires_grad_(False)
        self.has_critic = ppo_args.uses_critic
        if not self.has_critic:
            value_head = None
        elif rm_shares_base and ppo_args.critic_init == "reward":
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
        separate = {s: frozen_model(load_reward_model(s, dtype=compute_dtype(train_args), device=dist.device), None, dist)
                    for s in ppo_args.reward_model if is_model_source(s) and s not in reward_models}
        self.reward = build_reward(ppo_args.reward_model, ppo_args.reward_weights, ppo_args.reward_normalize,
                                   batch_size=train_args.per_device_eval_batch_size, settings=reward_settings,
                                   models={**reward_models, **separate},
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
        with self.actor.forward_context():
            yield self.shared.peft_model

    def policy_weights(self):
        self.shared.use("actor")  # base + SFT adapter + PPO adapter: the stack the actor computes with
        return policy_weights(self.shared.peft_model)

    def actor_logits(self, inputs: dict, keep: int = 0) -> torch.Tensor:
        with self.actor.forward_context():
            return self.shared("actor", **inputs, logits_to_keep=keep)

    @torch.no_grad()
    def ref_logits(self, inputs: dict, keep: int = 0) -> torch.Tensor:
        with self.actor.forward_context():
            return self.shared("ref", **inputs, logits_to_keep=keep)

    def values(self, inputs: dict) -> torch.Tensor:
        with self.actor.forward_context():
            return self.shared("critic", inputs["input_ids"], inputs["attention_mask"])

    def train(self, mode: bool) -> None:
        self.actor.train(mode)

    def backward_actor(self, loss: torch.Tensor) -> None:
        self.actor.backward(loss)

    def backward_critic(self, loss: torch.Tensor) -> None:
        self.actor.backward(self.vf_coef * loss)  # one optimizer trains both: the value loss is weighed

    def optimizer_step(self) -> dict[str, float]:
        norm = self.actor.optimizer_step()
        return {"grad_norm": norm} if norm is not None else {}

    def trainable_actor_parameters(self):
        return [p for n, p in self.shared.named_parameters() if f".{PPO_ADAPTER}." in n]

    def save_actor(self, directory: Path, tokenizer, state_dict: dict | None = None) -> None:
        self.shared.use("actor")
        save_policy(self.shared.peft_model, directory, tokenizer, self.sft_adapters, self.base_path, PPO_ADAPTER)

    def save_critic(self, directory: Path, tokenizer, state_dict: dict | None = None) -> None:
        directory = Path(directory)
        self.shared.peft_model.save_pretrained(directory, selected_adapters=[CRITIC_ADAPTER])
        torch.save(self.shared.value_head.state_dict(), directory / "value_head.pt")


def build_roles(ppo_args, model_args, backbone, train_args, tokenizer, steps: int, dist, ds_config, reward_settings) -> Roles:
    holder = SharedRoles if ppo_args.shared_backbone else SeparateRoles
    return holder(ppo_args, model_args, backbone, train_args, tokenizer, steps, dist, ds_config, reward_settings)
