"""The models behind PPO's roles: the actor and the critic as the SFT and reward models start them, and the
shared backbone (one base model carrying every role as adapters, ``SharedBackbone``). ``roles.py`` holds them."""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from rewards.model import SCORE_HEAD, RewardModel, score_head
from stages.common.backbone import apply_backbone, load_pretrained, peft_config, prepare_for_training, quantization_config
from stages.common.loading import adapter_base_path, attach_adapters, policy_adapters
from stages.common.masks import last_token_index, position_ids_from_mask
from stages.common.policy import activate_adapters, load_trainable_policy, mark_trainable, upcast_unless_deepspeed, with_path

PPO_ADAPTER, CRITIC_ADAPTER, REWARD_ADAPTER = "ppo", "critic", "reward"


def disable_dropout(model: nn.Module) -> None:
    """PPO compares log-probs of the same tokens at rollout and update time; dropout would make them differ."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_actor_model(model_args, backbone, train_args):
    """The SFT model as the starting policy, a new PPO adapter stacked over the SFT adapter(s) (stages/common/policy.py)."""
    return load_trainable_policy(model_args, backbone, train_args, PPO_ADAPTER)


def load_critic_model(ppo_args, model_args, backbone, train_args, pad_token_id: int) -> RewardModel:
    """A value model: the reward model by default (its head already scores responses), or the SFT model with
    a zero-initialized value head. Trains with the stage's backbone mode."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    path = ppo_args.first_reward_model() if ppo_args.critic_init == "reward" else model_args.model_name_or_path
    adapters = policy_adapters(path)
    model = load_pretrained(AutoModelForSequenceClassification, with_path(model_args, adapter_base_path(path) or path), backbone,
                            train_args, num_labels=1)
    model.config.pad_token_id = pad_token_id
    if ppo_args.critic_init == "actor":
        zero_head(score_head(model))
    if backbone.finetuning_type == "full":
        if adapters:
            model = attach_adapters(model, adapters, causal_lm=False).merge_and_unload()
        return RewardModel(apply_backbone(model, backbone, train_args, task_type="SEQ_CLS", head_modules=SCORE_HEAD))
    if ppo_args.critic_init == "reward" and len(adapters) == 1:  # keep training the RM's own adapter and head
        model = PeftModel.from_pretrained(prepare_for_training(model, backbone, train_args), adapters[0][1], is_trainable=True)
        upcast_unless_deepspeed(model, train_args)
        return RewardModel(model)
    if adapters:
        model = attach_adapters(prepare_for_training(model, backbone, train_args), adapters, causal_lm=False)
        model.add_adapter(CRITIC_ADAPTER, peft_config(backbone, "SEQ_CLS", SCORE_HEAD))
        model.base_model.set_adapter([name for name, _ in adapters] + [CRITIC_ADAPTER])
        mark_trainable(model, [CRITIC_ADAPTER])
        upcast_unless_deepspeed(model, train_args)
        return RewardModel(model)
    return RewardModel(apply_backbone(model, backbone, train_args, task_type="SEQ_CLS", head_modules=SCORE_HEAD))


def zero_head(head: nn.Module) -> None:
    import deepspeed

    params = list(head.parameters())
    context = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if hasattr(params[0], "ds_id") else nullcontext()
    with context, torch.no_grad():
        for param in params:
            param.zero_()


def actor_quantization(backbone, train_args):
    return quantization_config(backbone, train_args) if backbone.finetuning_type == "qlora" else None


def critic_train_args(train_args, ppo_args):
    if ppo_args.critic_learning_rate is None:
        return train_args
    return dataclasses.replace(train_args, learning_rate=ppo_args.critic_learning_rate)



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
        activate_adapters(self.peft_model, adapters, trainable=[PPO_ADAPTER, CRITIC_ADAPTER])

    def decoder(self) -> nn.Module:
        causal_lm = self.peft_model.get_base_model()
        return getattr(causal_lm, causal_lm.base_model_prefix)

    def forward(self, role: str, input_ids, attention_mask, position_ids=None, logits_to_keep: int = 0, **_):
        self.use(role)
        if role in ("actor", "ref"):
            return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                                   logits_to_keep=logits_to_keep).logits
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
