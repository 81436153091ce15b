"""The stages by name: the modules whose ``main`` runs them and the config dataclasses their keys belong to
(each stage declares its own in ``stages/<stage>/config.py``). Top layer: the pipeline and the command line
read it."""
from __future__ import annotations

from stages.dpo import config as dpo_config
from stages.eval import config as eval_config
from stages.ppo import config as ppo_config
from stages.rm import config as rm_config
from stages.sft import config as sft_config

STAGE_CONFIGS: dict[str, tuple[type, ...]] = {
    "sft": sft_config.ARGUMENTS,
    "rm": rm_config.ARGUMENTS,
    "ppo": ppo_config.ARGUMENTS,
    "dpo": dpo_config.ARGUMENTS,
    "eval": eval_config.ARGUMENTS,
}
STAGE_MODULES = {"sft": "stages.sft.train", "rm": "stages.rm.train", "ppo": "stages.ppo.train", "dpo": "stages.dpo.train", "eval": "stages.eval.compare"}
