"""`caft train-heads`: stage 1 alone. The base model is frozen and only the auxiliary heads learn.

    caft train-heads -model smollm2 -ts distilled.jsonl -es distilled_eval.jsonl -e 1 --output-dir runs/heads

The loss is sum_k gamma^k * CE_k; the trunk runs under no_grad. The heads folder is written after
every epoch (`heads-epoch-<n>/`) and at the end (`heads/`), with a README of how they were trained.
"""

from __future__ import annotations

import json
import logging
import os
import time

from transformers import TrainerCallback

from .config import TrainConfig
from .heads import save_heads
from .train import (
    TrainResult,
    checkpointing_arguments,
    find_resume_checkpoint,
    format_head_metrics,
    load_data,
    make_trainer,
    peak_memory_mb,
    read_previous_config,
    resolve_output_dir,
    set_trainable,
    setup_heads,
    training_arguments,
    write_run_config,
)

logger = logging.getLogger(__name__)


class SaveHeadsEachEpoch(TrainerCallback):
    """Write the heads folder at the end of every epoch."""

    def __init__(self, model, output_dir):
        self.model, self.output_dir = model, output_dir

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            epoch = round(state.epoch or 0)
            save_heads(self.model.caft_heads, self.output_dir / f"heads-epoch-{epoch}")


def heads_readme(config: TrainConfig, metrics: dict, steps: int, metrics_before: dict | None = None, data_stats=()) -> str:
    """Build the model card text of a heads folder: base model, data, steps and per-head accuracy before and after."""
    rows = "; ".join(f"{name}: {stats.summary()}" for name, stats in zip(("train", "held-out"), data_stats) if stats)
    held_out = config.eval_set or "-"
    if config.eval_fraction is not None:
        held_out = f"{config.eval_fraction:g} of the training rows, seed {config.seed}"
    lines = [
        "# CAFT auxiliary heads",
        "",
        f"- Base model: `{config.model_name_or_path}`",
        f"- Heads: {config.caft_num_heads} x {config.head_arch} ({config.caft_num_layers} layer(s)), wiring `{config.head_wiring}`",
        f"- Training data: `{config.train_set or 'embedded HumanEval split'}`; held-out: `{held_out}`",
        f"- Rows: {rows or '-'}; max length {config.model_max_length} tokens",
        f"- Optimizer steps: {steps} ({config.epochs:g} epoch(s)); learning rate {config.learning_rate}; gamma {config.caft_decay_coefficient}",
        "",
        "Head k predicts token t+1+k. Held-out metrics (head 0 is the base model's own next-token head;",
        "\"before\" is the heads as they started: copies of the last decoder layer unless -hdir gave others):",
        "",
        "| head | loss | top-1 | loss before | top-1 before |",
        "| --- | --- | --- | --- | --- |",
    ]
    before = metrics_before or {}
    losses_before = before.get("eval_loss_by_head") or []
    for k, loss in enumerate(metrics.get("eval_loss_by_head") or []):
        loss_before = f"{losses_before[k]:.4f}" if k < len(losses_before) else "-"
        acc_before = f"{before[f'eval_acc_head_{k}']:.3f}" if f"eval_acc_head_{k}" in before else "-"
        lines.append(f"| {k} | {loss:.4f} | {metrics.get(f'eval_acc_head_{k}', float('nan')):.3f} | {loss_before} | {acc_before} |")
    lines += ["", "Top-5 accuracy per head: `caft eval-heads --heads <this folder> --data <held-out data>`."]
    lines += ["", "Use them with `caft train -hdir <this folder>`."]
    return "\n".join(lines) + "\n"


def run_train_heads(config: TrainConfig) -> TrainResult:
    """Train only the heads on the given data and save the heads folder."""
    from transformers import set_seed

    from .collator import make_collator
    from .loading import load_model, load_tokenizer
    from .packing import check_packing_attention, pack_datasets

    start = time.time()
    for flag, value, meaningful in (("--mode", config.mode, "caft"), ("--finetune-method", config.finetune_method, "lora")):
        if value != meaningful:
            logger.warning("%s %s is ignored: train-heads trains only the heads, with the base model frozen.", flag, value)
    config.mode = "caft"
    output_dir = resolve_output_dir(config)
    previous = read_previous_config(config, output_dir)
    set_seed(config.seed)
    tokenizer = load_tokenizer(config.model_name_or_path)
    train_rows, eval_rows, train_stats, eval_stats = load_data(config, tokenizer)
    if config.packing:
        train_rows, eval_rows = pack_datasets(config, train_rows, eval_rows, heads_only=True)
    model = load_model(config.model_name_or_path, config.dtype, config.load_in_8bit, config.load_in_4bit)
    model.config.use_cache = False
    if config.packing:
        check_packing_attention(model, config, heads_only=True)
    config.heads_pretraining = True  # silences the "untrained heads" warning: training them is this command's job
    setup_heads(model, config)
    # One writer, so the other processes never see a half-written folder.
    write_run_config(config, output_dir, previous, is_main=int(os.environ.get("RANK", "0")) == 0)
    model.caft_state.mode = "heads_only"
    trainable = set_trainable(model, lambda name: name.startswith("caft_heads."))
    logger.info("Heads training: %d trainable parameters", trainable)

    args = training_arguments(
        config,
        output_dir,
        per_device_train_batch_size=config.per_device_batch_size * config.pretrain_bs_multiplier,
        **checkpointing_arguments(False),
        has_eval=bool(eval_rows),
    )
    trainer = make_trainer(model, tokenizer, args, train_rows, eval_rows, make_collator(tokenizer))
    trainer.add_callback(SaveHeadsEachEpoch(model, output_dir))
    result = TrainResult(output_dir=output_dir)
    if eval_rows and config.eval_before_training and not config.continue_from_checkpoint:
        result.metrics_before = trainer.evaluate()
        logger.info("Held-out before heads training: %s", format_head_metrics(result.metrics_before))
    resume = find_resume_checkpoint(output_dir) if config.continue_from_checkpoint else None
    output = trainer.train(resume_from_checkpoint=resume)
    result.train_metrics = output.metrics
    if eval_rows:
        result.metrics_after = trainer.evaluate()
        logger.info("Held-out after heads training: %s", format_head_metrics(result.metrics_after))
    result.wall_time_s = time.time() - start
    result.peak_memory_mb = peak_memory_mb()
    if trainer.args.should_save:
        readme = heads_readme(
            config, result.metrics_after, trainer.state.global_step, result.metrics_before, (train_stats, eval_stats)
        )
        save_heads(model.caft_heads, output_dir / "heads", readme=readme)
        metrics = {
            "eval_before": result.metrics_before,
            "eval": result.metrics_after,
            "train": result.train_metrics,
            "data": {"train": train_stats.__dict__, "eval": eval_stats.__dict__ if eval_stats else None},
            "wall_time_s": round(result.wall_time_s, 1),
            "peak_memory_mb": round(result.peak_memory_mb, 1),
        }
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    from .summary import finish_run

    finish_run(trainer, config, result, train_rows, "caft train-heads")
    return result
