"""tristage: SFT, reward model and PPO on one shared backbone."""
import logging

# bitsandbytes' CPU backend suggests installing `kernels`, which downloads kernels from a hub at run time;
# we never do that, so the suggestion is only noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import warnings

# DeepSpeed calls torch.distributed collectives that torch 2.13 renamed; one warning per call floods the log.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

# transformers draws a "Loading weights" bar per model; PPO loads four, and our own progress bar is the one to read.
try:
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover - transformers is a dependency
    pass
