"""CAFTTrainer: a transformers Trainer that computes the CAFT loss and logs every head.

What it changes in the Trainer:
- `_get_num_items_in_batch` counts valid targets per head over all micro-batches of an optimizer
  step and all processes; the model normalises each head's summed loss by that count.
- `compute_loss` updates the head schedule s(t), calls the model (which computes the CAFT loss in its
  forward) and collects per-head loss sums, target counts and top-1 hits for the logs.
- `log` adds `loss_head_k` and `acc_head_k` (token-weighted over the logging window).
- Saving writes the model or adapter without head keys, plus the heads as their own folder.
  Checkpoints are written to a staging folder and renamed when complete, with caft_state.json
  (see checkpoint.py); resuming checks that state against the run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpoint import (
    CHECKPOINT_STATE_NAME,
    STAGE_FINETUNING,
    STAGE_HEADS,
    StopOnSignal,
    checkpoint_state,
    newest_checkpoint,
    publish_checkpoint,
    read_checkpoint_state,
    remove_staging_dirs,
    staging_dir,
    write_json_atomic,
)
from .heads import save_heads
from .loss import count_targets, schedule_value
from .model import unwrap_causal_lm
from .tracking import check_report_to, place_tensorboard_logs

logger = logging.getLogger(__name__)

HEADS_CHECKPOINT_NAME = "caft_heads.safetensors"
HEADS_LORA_PATTERN = r"caft_heads\..*"
"""The peft rank and alpha pattern key that gives the heads' LoRA layers their own rank (--heads-r-multiplier)."""
REAL_EVAL_DECAY = 0.8

_BaseTrainer = transformers.Trainer


def caft_compute_metrics(eval_prediction) -> dict:
    """Turn the gathered per-row head statistics into exact token-weighted per-head metrics.

    `eval_loss_by_head` lists head 0 first; `eval_real_eval_loss` is sum_k 0.8^k * loss_k, the
    figure the original CAFT code reports.
    """
    stats = eval_prediction.predictions
    if isinstance(stats, (tuple, list)):
        stats = stats[0]
    totals = np.asarray(stats, dtype=np.float64).reshape(-1, *np.shape(stats)[-2:]).sum(axis=0)  # (heads, 3)
    counts = np.maximum(totals[:, 1], 1.0)
    losses = totals[:, 0] / counts
    accuracies = totals[:, 2] / counts
    metrics = {"loss_by_head": [round(float(x), 6) for x in losses]}
    metrics["real_eval_loss"] = float(sum(REAL_EVAL_DECAY**k * loss for k, loss in enumerate(losses)))
    for k, (loss, accuracy, count) in enumerate(zip(losses, accuracies, totals[:, 1])):
        metrics[f"loss_head_{k}"] = float(loss)
        metrics[f"acc_head_{k}"] = float(accuracy)
        metrics[f"targets_head_{k}"] = int(count)
    return metrics


def preprocess_logits_for_metrics(logits, labels):
    """Keep the (B, heads, 3) statistics tensor the CAFT forward returns in place of vocabulary logits."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits


class CAFTSaveLogging(TrainerCallback):
    """Append every training and evaluation log to `<output_dir>/loss_log.csv` (main process only)."""

    def __init__(self, filename: str = "loss_log.csv"):
        self.filename = filename
        self.columns: list[str] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        """Drop the rows after the step training starts from: those of an interrupted run after its checkpoint."""
        path = Path(args.output_dir) / self.filename
        if not state.is_world_process_zero or not path.is_file() or path.stat().st_size == 0:
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns, rows = reader.fieldnames, list(reader)
        up_to_start = [row for row in rows if float(row["step"]) <= state.global_step]
        if len(up_to_start) < len(rows):
            logger.info(
                "%s: dropped %d rows logged after step %d, where training resumes.",
                path, len(rows) - len(up_to_start), state.global_step,
            )
            _write_rows(path, columns, up_to_start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        row = {"step": state.global_step, "epoch": logs.get("epoch", state.epoch), "split": split}
        for key, value in logs.items():
            name = key[len("eval_"):] if key.startswith("eval_") else key
            if isinstance(value, (int, float)) and name not in ("epoch",):
                row[name] = value
        path = Path(args.output_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.columns is None:
            self.columns = _csv_columns(path)
        new_columns = [key for key in row if key not in (self.columns or [])]
        if self.columns is None or new_columns:
            self.columns = (self.columns or []) + new_columns
            _rewrite_with_columns(path, self.columns)
        with open(path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow(row)


def _csv_columns(path: Path) -> list[str] | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, newline="") as handle:
        return next(csv.reader(handle), None)


def _rewrite_with_columns(path: Path, columns: list[str]) -> None:
    """Rewrite the CSV with a widened header, keeping every existing row."""
    rows = []
    if path.is_file() and path.stat().st_size > 0:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    _write_rows(path, columns, rows)


def _write_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Replace the CSV at `path` with `rows` under the header `columns`, through a temporary file."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class CAFTTrainer(_BaseTrainer):
    """A Trainer for models with auxiliary heads (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", caft_compute_metrics)
        kwargs.setdefault("preprocess_logits_for_metrics", preprocess_logits_for_metrics)
        callbacks = list(kwargs.get("callbacks") or [])
        if not any(isinstance(c, CAFTSaveLogging) or c is CAFTSaveLogging for c in callbacks):
            callbacks.append(CAFTSaveLogging())
        kwargs["callbacks"] = callbacks
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            check_report_to(training_args.report_to)
        super().__init__(*args, **kwargs)
        place_tensorboard_logs(self)
        if self.args.label_names is None:
            self.args.label_names = ["labels"]
        self.label_names = self.args.label_names
        # The model normalises by counts over the whole optimizer step, so the Trainer must not divide again.
        self.loss_is_scaled_for_ga = True
        self._head_stats: torch.Tensor | None = None

    @property
    def caft_model(self):
        return unwrap_causal_lm(self.model)

    @property
    def num_heads(self) -> int:
        return len(self.caft_model.caft_heads)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Count each head's valid targets over all micro-batches of the step and all processes.  # (heads + 1,)"""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        counts = sum(
            count_targets(batch["labels"], self.num_heads, batch.get("position_ids")).to(device)
            for batch in batch_samples
        )
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        state = self.caft_model.caft_state
        state.step = self.state.global_step
        state.schedule_value = schedule_value(state.schedule, self.state.global_step, max(self.state.max_steps, 1))

        training = model.training
        per_head_counts = torch.is_tensor(num_items_in_batch) and num_items_in_batch.dim() == 1
        if training and per_head_counts:
            inputs = {**inputs, "caft_num_items": num_items_in_batch}
        outputs = model(**inputs)
        loss = outputs["loss"]
        if training and per_head_counts and self.args.world_size > 1:
            # DDP averages gradients over processes, but each process's loss is already a share of the global sum.
            loss = loss * self.args.world_size
        if training and outputs.get("head_stats") is not None:
            stats = outputs["head_stats"].detach()
            self._head_stats = stats if self._head_stats is None else self._head_stats + stats
        if not training:
            # Evaluation gathers every output but the loss; keep only the (B, heads, 3) row statistics.
            outputs = type(outputs)(loss=outputs["loss"], logits=outputs["logits"])
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._head_stats is not None:
            stats = self._head_stats
            if self.args.world_size > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            counts = stats[:, 1].clamp(min=1)
            for k in range(stats.shape[0]):
                logs[f"loss_head_{k}"] = round(float(stats[k, 0] / counts[k]), 6)
                logs[f"acc_head_{k}"] = round(float(stats[k, 2] / counts[k]), 6)
            logs["caft_schedule"] = round(self.caft_model.caft_state.schedule_value, 6)
            self._head_stats = None
            for k in range(stats.shape[0]):
                if not math.isfinite(logs[f"loss_head_{k}"]):
                    raise FloatingPointError(f"Head {k} logged a non-finite loss at step {self.state.global_step}.")
        # Trackers (TensorBoard, MLflow) drop list values with a warning, so they get the per-head scalars only;
        # log_history and the returned metrics keep lists such as eval_loss_by_head.
        lists = {key: value for key, value in logs.items() if isinstance(value, (list, tuple))}
        scalars = {key: value for key, value in logs.items() if key not in lists}
        super().log(scalars, start_time)
        self.state.log_history[-1].update(lists)
        logs.update(scalars)

    # Saving -----------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the model or adapter without head keys, the heads folder, and the heads' raw state for resuming."""
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            state_dict = model.state_dict()
        plain_state = {key: value for key, value in state_dict.items() if "caft_heads." not in key}
        heads_state = {
            key.split("caft_heads.", 1)[1]: value.detach().cpu().contiguous()
            for key, value in state_dict.items()
            if "caft_heads." in key
        }
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if not self._trains_heads_only:
            # Training only the heads leaves the base model as loaded, so its checkpoints hold the heads alone.
            model.save_pretrained(output_dir, state_dict=plain_state, safe_serialization=True)
            _drop_head_patterns(os.path.join(output_dir, "adapter_config.json"))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        if heads_state:
            from safetensors.torch import save_file

            save_file(heads_state, os.path.join(output_dir, HEADS_CHECKPOINT_NAME), metadata={"format": "pt"})
            # TODO: under ZeRO-3 or sharded FSDP the live modules hold shards; build this folder from heads_state.
            save_heads(self.caft_model.caft_heads, os.path.join(output_dir, "heads"))

    @property
    def _trains_heads_only(self) -> bool:
        return self.caft_model.caft_state.mode == "heads_only"

    @property
    def _stage(self) -> str:
        return STAGE_HEADS if self._trains_heads_only else STAGE_FINETUNING

    def _save_checkpoint(self, model, trial) -> None:
        """Write the Trainer's checkpoint plus caft_state.json into a staging folder, then publish it by renaming.

        All processes write into the same staging folder (each its own RNG state, and its optimizer
        shard under DeepSpeed or FSDP); the main process renames it once every process has finished.
        """
        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        staging = staging_dir(run_dir, step)
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()

        self._get_output_dir = lambda trial=None: str(staging)  # the parent Trainer writes <run_dir>/checkpoint-<step>
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        staged = staging / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if self.args.should_save:
            if self.state.best_model_checkpoint == str(staged):
                self.state.best_model_checkpoint = str(final)
                self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
            state = checkpoint_state(self.caft_model.caft_state, step, self._stage, self.num_heads)
            state["finetune_method"] = "lora" if _is_peft(self.model) else "sft"
            write_json_atomic(staged / CHECKPOINT_STATE_NAME, state)
        self.accelerator.wait_for_everyone()

        if self.args.should_save:
            publish_checkpoint(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Train; `resume_from_checkpoint=True` picks the newest complete checkpoint, and its CAFT state is checked."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint in {self.args.output_dir} to resume from.")
        if resume_from_checkpoint:
            self._check_checkpoint_state(resume_from_checkpoint)
        if self.args.should_save:
            remove_staging_dirs(self.args.output_dir)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)
        finally:
            # on_train_end restores the handlers, but an exception inside the loop skips it.
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, StopOnSignal):
                    callback.restore_handlers()

    def _check_checkpoint_state(self, checkpoint: str) -> None:
        """Refuse a checkpoint of another stage or head count; warn when the CAFT loss settings changed."""
        saved = read_checkpoint_state(checkpoint)
        if saved is None:
            raise ValueError(
                f"Checkpoint {checkpoint} has no readable {CHECKPOINT_STATE_NAME}: it is incomplete or was not written "
                "by caft. Delete it to resume from an earlier checkpoint."
            )
        if saved.get("finetune_method") == "full":  # the name earlier caft versions wrote for sft
            saved["finetune_method"] = "sft"
        method = "lora" if _is_peft(self.model) else "sft"
        expected = {"stage": self._stage, "num_heads": self.num_heads, "finetune_method": method}
        for key, value in expected.items():
            if saved.get(key, value) != value:
                raise ValueError(
                    f"Checkpoint {checkpoint} was written with {key}={saved[key]!r}, but this run has {key}={value!r}. "
                    "Resume with the settings of the interrupted run, or start a new --output-dir."
                )
        state = self.caft_model.caft_state
        for key in ("mode", "beta", "gamma", "schedule", "chunk_size"):
            if key in saved and saved[key] != getattr(state, key):
                logger.warning("Resuming %s with %s=%r (the checkpoint used %r).", checkpoint, key, getattr(state, key), saved[key])
        state.step = int(saved.get("global_step", state.step))
        state.schedule_value = float(saved.get("schedule_value", state.schedule_value))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._trains_heads_only:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_heads_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._trains_heads_only:
            super()._load_best_model()
        self._load_heads_checkpoint(self.state.best_model_checkpoint)

    def _load_heads_checkpoint(self, checkpoint: str, model=None) -> None:
        """Load caft_heads.safetensors strictly; missing or unexpected keys raise, naming them."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # NOTE: these backends restore every parameter, heads included, from their own checkpoint files
            # (sharded tensors would not take a plain load_state_dict). Not tested here: no GPUs.
            return
        path = os.path.join(checkpoint, HEADS_CHECKPOINT_NAME)
        heads = unwrap_causal_lm(model or self.model).caft_heads
        if not os.path.isfile(path):
            if len(heads):
                raise FileNotFoundError(f"Checkpoint {checkpoint} has no {HEADS_CHECKPOINT_NAME} for the {len(heads)} heads.")
            return
        from safetensors.torch import load_file

        missing, unexpected = heads.load_state_dict(load_file(path), strict=False)
        if missing or unexpected:
            raise ValueError(f"Checkpoint {path} does not match the heads: missing {missing}, unexpected {unexpected}.")


def _drop_head_patterns(adapter_config_path: str) -> None:
    """Remove the heads' entries from a saved adapter's `rank_pattern` and `alpha_pattern`, if it is an adapter.

    The adapter file contains no head weights (the heads/ folder has them, merged), so on a base
    model without heads those entries match nothing, and peft warns about them at every load.
    Resuming is unaffected, since the Trainer loads a checkpoint into the adapter it has already built.
    """
    if not os.path.isfile(adapter_config_path):
        return
    with open(adapter_config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    changed = False
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        without_heads = {pattern: value for pattern, value in patterns.items() if pattern != HEADS_LORA_PATTERN}
        if without_heads != patterns:
            config[key] = without_heads
            changed = True
    if changed:
        with open(adapter_config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)


def _is_peft(model) -> bool:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return type(model).__name__.startswith("Peft")


def add_caft_loss(transformers_module=transformers):
    """Make `transformers.Trainer` construct a CAFTTrainer, as the original CAFT API does.

    Usage: `add_caft_loss(transformers)` once, then build `transformers.Trainer(...)` as usual.
    """
    transformers_module.Trainer = CAFTTrainer
    return transformers_module
