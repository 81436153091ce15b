"""The supervised training loop shared by SFT and the reward model: epochs of seeded shuffles, gradient
accumulation with the loss normalized over the whole window (and over all ranks), periodic logging, eval
and checkpoints, exact resume, and the final save.

A stage supplies an ``Objective``: how many items (tokens, pairs) a batch holds, and the summed loss.
"""
from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Protocol

import torch

from .distributed import DistInfo, all_reduce_sum, any_rank, barrier
from .engine import TrainingEngine
from .errors import ConfigError, RunError
from .seeds import EPOCH_ORDER, derive_seed
from .tracking import RunTracker

TRAINER_STATE = "trainer_state.json"


class Objective(Protocol):
    def count(self, batch: dict) -> float: ...

    def loss_sum(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed loss over the batch's items, and summed extra metrics (each divided by the count later)."""


def _strategy(value) -> str:
    return str(getattr(value, "value", value))  # TrainingArguments holds IntervalStrategy enums


def rank_micro_batches(num_rows: int, epoch: int, seed: int, micro_batch: int, dist: DistInfo) -> list[list[int]]:
    """This rank's micro-batches for an epoch: a seeded permutation, split evenly over the ranks."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(derive_seed(seed, EPOCH_ORDER, epoch))).tolist()
    per_rank = num_rows // dist.world_size
    mine = order[dist.rank * per_rank : (dist.rank + 1) * per_rank]
    return [mine[i : i + micro_batch] for i in range(0, per_rank, micro_batch)]


def steps_per_epoch(num_rows: int, train_args, dist: DistInfo) -> int:
    micro_batches = math.ceil((num_rows // dist.world_size) / train_args.per_device_train_batch_size)
    steps = micro_batches // train_args.gradient_accumulation_steps
    if steps == 0:
        raise ConfigError(
            f"{num_rows} training rows are fewer than one optimizer step needs "
            f"({train_args.per_device_train_batch_size} per device x {train_args.gradient_accumulation_steps} accumulation x "
            f"{dist.world_size} processes)", key="per_device_train_batch_size")
    return steps


def check_eval_plan(train_args, eval_rows: list) -> None:
    """Before any model loads: what needs held-out data has it."""
    if train_args.load_best_model_at_end and not eval_rows:
        raise ConfigError("needs held-out data to pick the best checkpoint: set eval_dataset or val_size", key="load_best_model_at_end")


def total_steps(num_rows: int, train_args, dist: DistInfo) -> int:
    if train_args.max_steps and train_args.max_steps > 0:
        return train_args.max_steps
    return max(1, math.ceil(train_args.num_train_epochs * steps_per_epoch(num_rows, train_args, dist)))


def find_checkpoint(train_args) -> Path | None:
    """``resume_from_checkpoint``: a checkpoint directory, or true/last for the newest in output_dir."""
    wanted = train_args.resume_from_checkpoint
    if not wanted or str(wanted).lower() in ("false", "none"):
        return None
    if str(wanted).lower() in ("true", "last", "latest"):
        found = sorted(Path(train_args.output_dir).glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[-1]))
        return found[-1] if found else None
    path = Path(wanted)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"{wanted} is not a complete checkpoint (no {TRAINER_STATE})", key="resume_from_checkpoint")
    return path


def refuse_model_only(checkpoint: Path) -> None:
    """A save_only_model checkpoint has the weights but not the optimizer and scheduler a resume needs."""
    if json.loads((checkpoint / TRAINER_STATE).read_text()).get("model_only"):
        raise ConfigError(f"{checkpoint} was saved with save_only_model: it has the model but not the optimizer and scheduler "
                          "states a resume needs (start a new run from it with model_name_or_path)", key="resume_from_checkpoint")


def atomic_checkpoint(output_dir: str, step: int, state: dict, keep: int | None, write: Callable[[Path], None],
                      protect: Path | None = None) -> Path:
    """``write(directory)`` runs on every rank into a temporary directory that is renamed when complete, so
    a crash never leaves a half checkpoint that resume would pick up. Keeps the newest ``keep`` (and ``protect``,
    the best one of load_best_model_at_end)."""
    from .distributed import is_main_process

    final = Path(output_dir) / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".tmp")
    main = is_main_process()
    if main and partial.exists():
        shutil.rmtree(partial)
    barrier()
    try:
        write(partial)
        barrier()
        if main:
            (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2))
    except OSError as err:  # a full disk (ENOSPC) or a failing writer: drop the partial copy, keep the last good one
        shutil.rmtree(partial, ignore_errors=True)
        previous = sorted(Path(output_dir).glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[-1]))
        raise RunError(f"saving {final} failed: {err.strerror or err}; "
                       f"{'the previous checkpoint ' + str(previous[-1]) + ' is intact' if previous else 'no earlier checkpoint exists'}"
                       ) from None
    if main:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if keep:
            done = sorted(Path(output_dir).glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[-1]))
            for old in done[:-keep]:
                if protect is None or old.resolve() != Path(protect).resolve():
                    shutil.rmtree(old)
    barrier()
    return final


class NonFiniteStreak:
    """Counts skipped (NaN/inf) steps; too many in a row is an error, since the run will not recover by itself."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what, self.run, self.total = limit, what, 0, 0

    def update(self, skipped: bool, step: int) -> None:
        self.run = self.run + 1 if skipped else 0
        self.total += int(skipped)
        if skipped:
            warnings.warn(f"step {step}: a NaN/inf loss or gradient; the update was skipped", stacklevel=2)
        if self.limit and self.run >= self.limit:
            raise RunError(f"{self.run} {self.what} in a row were NaN/inf (last at step {step}); stopping. Lower learning_rate, "
                           "check the data, prefer bf16 to fp16, or raise max_nonfinite_steps; saved checkpoints hold finite weights")


def check_finite_weights(module: torch.nn.Module, what: str) -> None:
    """No checkpoint or model with a NaN/inf weight is ever written (each rank checks the shards it holds)."""
    local = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in module.parameters() if p.requires_grad]
    if any_rank(not all(bool(torch.isfinite(t).all()) for t in local)):
        raise RunError(f"{what}: the weights hold NaN/inf; refusing to save them (the last checkpoint is intact)")


def save_checkpoint(engine: TrainingEngine, output_dir: str, step: int, state: dict, keep: int | None, model_only: bool = False,
                    protect: Path | None = None) -> Path:
    """The engine's whole state (for resume), or with ``model_only`` (save_only_model) just the weights as save_model writes them."""
    check_finite_weights(engine.module, f"checkpoint-{step}")
    if model_only:
        state = {**state, "model_only": True}
        return atomic_checkpoint(output_dir, step, state, keep, lambda directory: write_weights(engine, directory), protect)
    return atomic_checkpoint(output_dir, step, state, keep, lambda directory: engine.save_checkpoint(directory, client_state=state),
                             protect)


class BestCheckpoint:
    """load_best_model_at_end: the checkpoint whose eval metric (metric_for_best_model, default loss) was best."""

    def __init__(self, train_args):
        name = train_args.metric_for_best_model or "loss"
        self.key = name if name.startswith("eval_") else f"eval_{name}"
        self.greater = train_args.greater_is_better if train_args.greater_is_better is not None else not self.key.endswith("loss")
        self.path, self.value = None, None

    def consider(self, path: Path, metrics: dict) -> None:
        value = metrics[self.key]
        if self.value is None or (value > self.value if self.greater else value < self.value):
            self.path, self.value = path, value


def lockstep_batches(rows: list[dict], collate: Callable, micro_batch: int, dist: DistInfo):
    """This rank's share of ``rows`` in batches, as (batch, counts). Every rank yields the same number of
    batches, because ZeRO-3 forwards are collective; padding batches repeat a row and have counts=False."""
    mine = rows[dist.rank :: dist.world_size]
    for b in range(math.ceil(math.ceil(len(rows) / dist.world_size) / micro_batch)):
        chunk = mine[b * micro_batch : (b + 1) * micro_batch]
        yield collate(chunk or rows[:1]), bool(chunk)


@torch.no_grad()
def evaluate(engine: TrainingEngine, rows: list[dict], collate: Callable, objective: Objective, micro_batch: int) -> dict[str, float]:
    """Mean loss (and extra metrics) over the eval rows, sharded over the ranks."""
    engine.train(False)
    totals: dict[str, float] = {"loss": 0.0, "count": 0.0}
    for batch, counts in lockstep_batches(rows, collate, micro_batch, engine.dist):
        with engine.forward_context():
            loss, extra = objective.loss_sum(engine.forward_model, batch)
        if counts:
            totals["loss"] += loss.item()
            totals["count"] += objective.count(batch)
            for key, value in extra.items():
                totals[key] = totals.get(key, 0.0) + value
    engine.train(True)
    keys = sorted(totals)
    summed = dict(zip(keys, all_reduce_sum([totals[k] for k in keys])))
    count = max(summed.pop("count"), 1.0)
    return {f"eval_{k}": v / count for k, v in summed.items()}


def fit(engine: TrainingEngine, rows: list[dict], eval_rows: list[dict], collate: Callable, objective: Objective,
        train_args, tracker: RunTracker, steps: int, extra_eval: Callable[[dict], dict] | None = None) -> dict:
    """Train for ``steps`` optimizer steps; returns the last logged metrics (eval included)."""
    dist = engine.dist
    micro, accumulation = train_args.per_device_train_batch_size, train_args.gradient_accumulation_steps
    windows = steps_per_epoch(len(rows), train_args, dist)
    step = 0
    checkpoint = find_checkpoint(train_args)
    best = BestCheckpoint(train_args) if train_args.load_best_model_at_end else None
    if checkpoint is not None:
        refuse_model_only(checkpoint)
        resumed = engine.load_checkpoint(checkpoint)
        step = int(resumed["global_step"])
        if best is not None and resumed.get("best"):
            best.path, best.value = Path(resumed["best"]["path"]), resumed["best"]["value"]
        tracker.message(f"resumed from {checkpoint} at step {step}")
    eval_every = train_args.eval_steps or train_args.logging_steps
    do_eval = bool(eval_rows) and _strategy(train_args.eval_strategy) == "steps"

    def eval_metrics() -> dict:
        metrics = evaluate(engine, eval_rows, collate, objective, train_args.per_device_eval_batch_size)
        return {**metrics, **(extra_eval(metrics) if extra_eval else {})}

    last: dict = {}
    nonfinite = NonFiniteStreak(train_args.max_nonfinite_steps, "optimizer steps")
    window_loss, window_count, window_extra, window_tokens, window_time = 0.0, 0.0, {}, 0, time.time()
    engine.train(True)
    while step < steps:
        epoch = step // windows
        batches = rank_micro_batches(len(rows), epoch, train_args.seed, micro, dist)
        for w in range(step % windows, windows):
            window = [collate([rows[i] for i in ids]) for ids in batches[w * accumulation : (w + 1) * accumulation]]
            # Normalize by the items of the whole window on all ranks: DeepSpeed averages gradients over
            # ranks, so scaling by world_size / global count gives the exact mean over every item.
            global_count = all_reduce_sum([sum(objective.count(b) for b in window)])[0]
            scale = dist.world_size / max(global_count, 1.0)
            window_bad = False
            for batch in window:
                with engine.forward_context():
                    loss, extra = objective.loss_sum(engine.forward_model, batch)
                if any_rank(not bool(torch.isfinite(loss))):  # all ranks skip together (ZeRO-3 steps are collective)
                    engine.skip_backward()
                    window_bad = True
                    continue
                engine.backward(loss * scale)
                window_loss += loss.item()
                window_tokens += int(batch["input_ids"].numel())
                for key, value in extra.items():
                    window_extra[key] = window_extra.get(key, 0.0) + value
            window_count += global_count / dist.world_size
            grad_norm = engine.optimizer_step()
            step += 1
            overflow = engine.overflowed  # fp16's loss scaler skipped the step and lowered its scale: expected, not a NaN
            nonfinite.update(window_bad or ((grad_norm is None or not math.isfinite(grad_norm)) and not overflow), step)
            tracker.advance_to(step, f"loss {window_loss / max(window_count, 1):.4f}")
            log_now, eval_now = step % train_args.logging_steps == 0 or step == steps, do_eval and (step % eval_every == 0 or step == steps)
            if log_now:
                keys = sorted(window_extra)
                sums = all_reduce_sum([window_loss, window_count, float(window_tokens)] + [window_extra[k] for k in keys])
                elapsed = time.time() - window_time
                last = {"loss": sums[0] / max(sums[1], 1.0), "learning_rate": engine.learning_rate(), "epoch": round(step / windows, 4),
                        "tokens_per_second": sums[2] / max(elapsed, 1e-9)}
                last.update({k: v / max(sums[1], 1.0) for k, v in zip(keys, sums[3:])})
                if grad_norm is not None:
                    last["grad_norm"] = grad_norm
                last["skipped_steps"] = nonfinite.total
                window_loss, window_count, window_extra, window_tokens, window_time = 0.0, 0.0, {}, 0, time.time()
            if eval_now:  # on its own schedule: eval_steps need not be a multiple of logging_steps
                last.update(eval_metrics())
            if log_now or eval_now:
                tracker.log(step, last)
            if _strategy(train_args.save_strategy) == "steps" and step % train_args.save_steps == 0 and step < steps:
                path = Path(train_args.output_dir) / f"checkpoint-{step}"
                if best is not None:  # (save_steps is a multiple of eval_steps: transformers checks it)
                    best.consider(path, last)
                state = {"global_step": step, "metrics": last,
                         "best": {"path": str(best.path), "value": best.value} if best is not None else None}
                save_checkpoint(engine, train_args.output_dir, step, state, train_args.save_total_limit, train_args.save_only_model,
                                best.path if best is not None else None)
            if step >= steps:
                break
    if eval_rows and "eval_loss" not in last:
        last.update(eval_metrics())
        tracker.log(step, last)
    if best is not None:  # the end is a candidate too: the best of the checkpoints and the final weights
        final = last[best.key]
        final_is_best = best.path is None or (final > best.value if best.greater else final < best.value)
        if not final_is_best:
            engine.load_checkpoint(best.path)
            tracker.message(f"loaded the best checkpoint {best.path} ({best.key} {best.value:.4g})")
            last = {**last, "best_model_checkpoint": str(best.path), "best_metric": best.value}
        else:
            last = {**last, "best_model_checkpoint": None, "best_metric": last[best.key]}
    return {"global_step": step, **last}


def save_model(engine: TrainingEngine, tokenizer, output_dir: str, final_state: dict) -> None:
    """What the HF ecosystem loads: save_pretrained of the full model or of the peft adapter, the tokenizer,
    and trainer_state.json (whose presence marks a finished run). Under ZeRO-3 the shards are gathered."""
    check_finite_weights(engine.module, "the final model")
    write_weights(engine, Path(output_dir))
    if engine.dist.is_main:
        tokenizer.save_pretrained(output_dir)
        (Path(output_dir) / TRAINER_STATE).write_text(json.dumps(final_state, indent=2))
    barrier()


def write_weights(engine: TrainingEngine, directory: Path) -> None:
    """save_pretrained of the full model or of the peft adapter (gathered from the ZeRO-3 shards; every rank calls it)."""
    state_dict = engine.consolidated_state_dict() if engine.zero_stage == 3 else None
    if engine.dist.is_main:
        if engine.save_weights is not None:
            engine.save_weights(engine.module, directory, state_dict)
        elif state_dict is not None:
            engine.module.save_pretrained(directory, state_dict=state_dict)
        else:
            engine.module.save_pretrained(directory)
    barrier()


def write_weight_digest(engine: TrainingEngine, output_dir: str) -> None:
    """Each rank writes sum and sum of squares of every full (gathered) parameter it holds at the end."""
    digest = {}
    with engine.gathered_parameters():
        for name, param in engine.module.named_parameters():
            values = param.detach().double()
            digest[name] = [float(values.sum()), float(values.pow(2).sum())]
    out = Path(output_dir) / "weight_digest"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{engine.dist.rank}.json").write_text(json.dumps(digest))
