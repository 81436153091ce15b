"""An exponential moving average of the actor's trainable weights (DeepSpeed-Chat's ``--enable_ema``):
a smoother policy to save next to the last one. Under ZeRO-3 each rank averages its own shards."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class ActorEMA:
    def __init__(self, params: list[torch.Tensor], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [_local(p).detach().float().cpu().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self.params):
            shadow.mul_(self.decay).add_(_local(param).detach().float().cpu(), alpha=1.0 - self.decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The model holds the averaged weights inside this block (to save them), its own weights after."""
        backup = [_local(p).detach().clone() for p in self.params]
        for shadow, param in zip(self.shadow, self.params):
            _local(param).copy_(shadow.to(_local(param).dtype))
        try:
            yield
        finally:
            for saved, param in zip(backup, self.params):
                _local(param).copy_(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = [t.clone() for t in state["shadow"]]
