"""Build the demo's base model and data with no download: a byte-level BPE tokenizer trained on the
task's text, a small Llama-architecture model initialized from a config, and the task's data files."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages.common.data import DEFAULT_CHAT_TEMPLATE
from stages.demo import judge, task

DEMO_VERSION = "tristage-demo-8"  # bump when the generated data or model change, so old builds are redone
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_tokenizer(lines: list[str], vocab_size: int):
    """Byte-level BPE: any text (Chinese included) is encodable, the vocabulary stays tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(lines, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", core.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def build_base_model(out_dir: str | Path, *, layers: int = 4, hidden: int = 128, heads: int = 4, vocab_size: int = 512,
                     max_positions: int = 256, seed: int = 0, corpus: list[str] | None = None) -> Path:
    """A randomly initialized LlamaForCausalLM and its tokenizer, saved where from_pretrained finds them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer(corpus or task.corpus_lines(), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def prepare_demo(out_dir: str | Path, seed: int = 0, force: bool = False) -> Path:
    """runs/demo/{base/, data/*.jsonl}; does nothing when already built (and not forced)."""
    out = Path(out_dir)
    done = out / "READY"
    if done.exists() and done.read_text().strip() == DEMO_VERSION and not force:
        return out
    train_q, eval_q = task.split_questions(seed)
    write_jsonl(out / "data" / "sft_train.jsonl", task.sft_records(train_q, per_question=6, seed=seed))
    write_jsonl(out / "data" / "sft_eval.jsonl", task.sft_records(eval_q, per_question=1, seed=seed + 1))
    write_jsonl(out / "data" / "prefs_train.jsonl", judge.preference_records(train_q, per_question=24, seed=seed))
    # Held-out pairs carry the gold judge's own labels (no annotator noise), so eval accuracy is gold accuracy.
    # prefs_eval: new response pairs on the training prompts (the RM's held-out split);
    # prefs_eval_unseen: pairs on prompts the RM never saw (new phrasings), a harder generalization check.
    write_jsonl(out / "data" / "prefs_eval.jsonl", judge.preference_records(train_q, per_question=2, seed=seed + 1, label_noise=0.0))
    write_jsonl(out / "data" / "prefs_eval_unseen.jsonl", judge.preference_records(eval_q, per_question=4, seed=seed + 2, label_noise=0.0))
    write_jsonl(out / "data" / "prompts_train.jsonl", task.prompt_records(train_q))
    write_jsonl(out / "data" / "prompts_eval.jsonl", task.prompt_records(eval_q))
    build_base_model(out / "base", seed=seed)
    done.write_text(DEMO_VERSION + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tristage demo", description="Build the demo base model and data (no download).")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    out = prepare_demo(args.out, args.seed, args.force)
    print(f"[tristage] demo base model and data in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
