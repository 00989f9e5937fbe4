"""The `caft train` pipeline: load, attach heads, optional heads pretraining, CAFT fine-tuning, save.

    caft train -model smollm2 -ts train.jsonl -es eval.jsonl -ftm lora -hpretrain -ft-heads -e 1

Stages:
1. (with -hpretrain) heads training: the base model is frozen and only the heads learn, for one
   epoch on the task data, loss sum_k gamma^k * CE_k.
2. CAFT fine-tuning with LoRA or full weights: CE_0 + beta * s(t) * sum_k gamma^k * CE_k
   (`--mode default` trains CE_0 alone, the next-token baseline).
With -cont-ckpt, a run resumes from its newest complete checkpoint, and `caft_stage.json` in the
run folder records whether stage 1 had finished (see checkpoint.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    RUN_STAGE_NAME,
    STAGE_FINETUNING,
    STAGE_HEADS_PRETRAINING,
    StopOnSignal,
    newest_checkpoint,
    read_run_stage,
    write_run_stage,
)
from .config import TrainConfig, save_config
from .heads import HeadsConfig, build_heads, load_heads_state, read_heads_file, save_heads
from .model import CAFTState, add_auxiliary_heads, unwrap_causal_lm
from .original import PUBLISHED_HEADS_WIRING, check_hub_reachable, is_published_heads, published_heads_repo
from .paths import check_output_folder

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    metrics_before: dict = field(default_factory=dict)
    metrics_after: dict = field(default_factory=dict)
    train_metrics: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0


def resolve_output_dir(config: TrainConfig) -> Path:
    """Pick the run folder; refuse to write into a non-empty one unless resuming or overwriting."""
    if config.output_dir is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Each process would stamp its own time, and the processes could pick different folders.
            raise ValueError("Multi-process training needs an explicit --output-dir shared by all processes.")
        model_name = Path(config.model_name_or_path.rstrip("/")).name or "model"
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        config.output_dir = str(Path("runs") / f"{model_name}-{config.mode}-{config.finetune_method}-{stamp}")
    path = Path(config.output_dir)
    check_output_folder(path, "--output-dir")
    # Only the main process checks: the others could already see files it wrote a moment ago.
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main and path.is_dir() and any(path.iterdir()) and not (config.continue_from_checkpoint or config.overwrite_output_dir):
        raise FileExistsError(
            f"Output folder {path} exists and is not empty. Pass another --output-dir, --continue-from-checkpoint "
            "to resume it, or --overwrite-output-dir to write into it."
        )
    if is_main and config.overwrite_output_dir and not config.continue_from_checkpoint and path.is_dir():
        _remove_earlier_run(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


EARLIER_RUN_FILES = ("loss_log.csv", "caft_stage.json", "config-before-resume.yaml", "heads_pretraining")
"""Outputs of an earlier run that a new run would mix with its own (besides checkpoint-* folders)."""


def _remove_earlier_run(path: Path) -> None:
    """Delete the checkpoints, loss log and stage records that an earlier run left in `path` (--overwrite-output-dir)."""
    import shutil

    removed = sorted(item for item in path.glob("checkpoint-*") if item.is_dir())
    removed += [path / name for name in EARLIER_RUN_FILES if (path / name).exists()]
    for item in removed:
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()
    if removed:
        logger.warning("--overwrite-output-dir: deleted %s of the earlier run in %s.", ", ".join(item.name for item in removed), path)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Heads ------------------------------------------------------------------------------------------


HEADS_FLAGS = {
    "caft_num_heads": ("num_heads", "--caft-num-heads"),
    "caft_num_layers": ("num_layers", "--caft-num-layers"),
    "head_arch": ("arch", "--head-arch"),
    "head_wiring": ("wiring", "--head-wiring"),
    "separate_unembed": ("separate_unembed", "--separate-unembed"),
}
"""TrainConfig fields that a saved heads folder decides, with the HeadsConfig field and the flag of each."""


def _take_saved_heads_settings(config: TrainConfig, heads_config: HeadsConfig, saved: HeadsConfig, source: str) -> None:
    """Copy the saved heads' settings into the heads to build and into the run's config, which config.yaml records.

    A config value that differs from both the saved one and the flag's default was most likely
    typed by the user, and gets a warning, since the heads folder decides.
    """
    defaults = {item.name: item.default for item in fields(TrainConfig)}
    for field_name, (heads_name, flag) in HEADS_FLAGS.items():
        used = getattr(saved, heads_name)
        setattr(heads_config, heads_name, used)
        flag_value = getattr(config, field_name)
        if flag_value != used and flag_value != defaults[field_name]:
            logger.warning("%s %s is ignored: the heads in %s have %s %s.", flag, flag_value, source, heads_name, used)
        setattr(config, field_name, used)


def setup_heads(model: nn.Module, config: TrainConfig, published_default: bool = False) -> None:
    """Attach heads to the model: loaded from -hdir, or new copies of the last layer.

    With `published_default` and no -hdir, a base model that has heads published by the CAFT
    authors (`caft.original.PUBLISHED_HEADS`) gets those, as the original training script did.
    """
    state = CAFTState(
        mode=config.mode,
        beta=config.caft_heads_coefficient,
        gamma=config.caft_decay_coefficient,
        schedule=config.caft_scheduler,
        chunk_size=config.loss_chunk_size,
    )
    heads_config = HeadsConfig(
        num_heads=config.caft_num_heads,
        num_layers=config.caft_num_layers,
        arch=config.head_arch,
        wiring=config.head_wiring,
        separate_unembed=config.separate_unembed,
        base_model=config.model_name_or_path,
    )
    use_heads = config.mode == "caft" or config.auxiliary_heads_dir or config.heads_pretraining
    if not use_heads:
        heads_config.num_heads = 0
    heads_source = config.auxiliary_heads_dir
    if not heads_source and use_heads and published_default:
        heads_source = published_heads_repo(config.model_name_or_path)
        if heads_source:
            logger.info("No -hdir given: using the heads published for %s, %s", config.model_name_or_path, heads_source)
    if heads_source:
        if is_published_heads(heads_source):
            check_hub_reachable(heads_source)
        saved_config, weights, source = read_heads_file(heads_source)
        if saved_config is not None:
            _take_saved_heads_settings(config, heads_config, saved_config, source)
            logger.info("Using the heads in %s (%s)", source, heads_config)
        elif is_published_heads(heads_source):
            # The published heads.pth has no config; those heads were trained with the original wiring.
            heads_config.wiring = PUBLISHED_HEADS_WIRING
            logger.info("Using the published heads %s with --head-wiring %s", source, PUBLISHED_HEADS_WIRING)
        heads = build_heads(model, heads_config)
        load_heads_state(heads, weights, source)
    else:
        heads = build_heads(model, heads_config)
        if config.mode == "caft" and not config.heads_pretraining:
            logger.warning(
                "No trained heads given: the %d heads start as copies of the last decoder layer. Train them first with "
                "-hpretrain or `caft train-heads`, then pass -hdir.",
                heads_config.num_heads,
            )
    add_auxiliary_heads(model, heads=heads, state=state)


def set_trainable(model: nn.Module, names_predicate) -> int:
    """Set requires_grad on exactly the parameters whose name satisfies the predicate; return their count."""
    total = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(bool(names_predicate(name)))
        total += parameter.numel() if parameter.requires_grad else 0
    return total


def lora_target_regex(model: nn.Module, targets: list[str], include_heads: bool) -> str:
    """Build a peft target regex: the named (or all linear) decoder modules, heads only when asked."""
    from transformers.pytorch_utils import Conv1D

    if targets == ["all-linear"]:
        names = set()
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and "lm_head" not in name and not name.startswith("caft_heads."):
                names.add(name.rsplit(".", 1)[-1])
        names.discard("score")
    else:
        names = set(targets)
    if not names:
        raise ValueError("No LoRA target modules found; pass --lora-target-modules with module names such as q_proj.")
    alternatives = "|".join(sorted(re.escape(name) for name in names))
    prefix = "" if include_heads else r"(?!caft_heads\.)"
    return rf"^{prefix}(.*\.)?({alternatives})$"


def checkpointing_arguments(enabled: bool) -> dict:
    """Return the TrainingArguments fields that switch activation checkpointing on or off.

    Recent transformers 5 releases call the option `activation_checkpointing` and warn at every
    run when the old name `gradient_checkpointing` is passed. Releases without the new field get
    the old name.
    """
    from transformers import TrainingArguments

    known = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def apply_finetune_method(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Make the stage-2 parameters trainable: LoRA adapters or full weights, heads per -ft-heads."""
    train_heads = config.finetune_heads and config.mode == "caft"
    if config.finetune_method == "lora":
        from peft import LoraConfig, get_peft_model

        from .trainer import HEADS_LORA_PATTERN

        target = lora_target_regex(model, config.lora_target_modules, include_heads=train_heads)
        multiplier = config.heads_r_multiplier
        lora_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=target,
            rank_pattern={HEADS_LORA_PATTERN: config.lora_r * multiplier} if train_heads else {},
            alpha_pattern={HEADS_LORA_PATTERN: config.lora_alpha * multiplier} if train_heads else {},
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
    else:
        frozen_unembedding = set()
        if config.freeze_unembedding:
            lm_head = model.get_output_embeddings()
            frozen_unembedding = {id(p) for p in lm_head.parameters()}
        for name, parameter in model.named_parameters():
            is_head = name.startswith("caft_heads.")
            trainable = (train_heads if is_head else True) and id(parameter) not in frozen_unembedding
            parameter.requires_grad_(trainable)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# Trainer setup -----------------------------------------------------------------------------------


def training_arguments(config: TrainConfig, output_dir: Path, **overrides):
    from transformers import TrainingArguments

    has_eval = overrides.pop("has_eval", True)
    strategy = "steps" if config.eval_steps else "epoch"
    save_strategy = "steps" if config.save_steps else "epoch"
    values = dict(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        weight_decay=config.weight_decay,
        optim=config.optimizer,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy=strategy if has_eval else "no",
        eval_steps=config.eval_steps,
        save_strategy=save_strategy,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to=[] if config.report_to == "none" else [config.report_to],
        remove_unused_columns=False,
        label_names=["labels"],
        **checkpointing_arguments(config.gradient_checkpointing),
        bf16=config.dtype == "bfloat16" and torch.cuda.is_available(),
        load_best_model_at_end=config.early_stopping_patience is not None and has_eval,
        metric_for_best_model="eval_loss" if config.early_stopping_patience is not None else None,
        ddp_find_unused_parameters=False,
        # Without an accelerator, processes started by torchrun only join a (gloo) process group with use_cpu.
        use_cpu=not _has_accelerator(),
        disable_tqdm=False,
    )
    values.update(overrides)
    _warn_about_ignored_sharding(values["use_cpu"])
    _check_deepspeed_installed()
    return TrainingArguments(**values)


def _launched_with(variable: str) -> bool:
    """Return whether `accelerate launch` set `variable` (ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED) to true."""
    return os.environ.get(variable, "").lower() == "true"


def _check_deepspeed_installed() -> None:
    """Raise a clear error when `accelerate launch` requested DeepSpeed but the package is missing."""
    import importlib.util

    if _launched_with("ACCELERATE_USE_DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            "accelerate launch asked for DeepSpeed, but the deepspeed package is not installed. Install it "
            "(pip install deepspeed) or launch with another config, such as configs/accelerate/ddp.yaml."
        )


def _warn_about_ignored_sharding(use_cpu: bool) -> None:
    """Warn when `accelerate launch` requested FSDP or DeepSpeed on a machine where training runs as CPU DDP."""
    engines = (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
    requested = [name for name, variable in engines if _launched_with(variable)]
    if use_cpu and requested:
        logger.warning(
            "accelerate launch asked for %s, but without a GPU the processes train with plain DDP over gloo, so "
            "parameters are not sharded. Use configs/accelerate/ddp.yaml on machines without a GPU.", requested[0],
        )


def _has_accelerator() -> bool:
    """Return whether torch finds a GPU or another accelerator (CUDA, MPS, XPU, ...)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def make_trainer(model, tokenizer, args, train_rows, eval_rows, collator, early_stopping_patience=None):
    from transformers import EarlyStoppingCallback

    from .trainer import CAFTTrainer

    callbacks = [StopOnSignal()]
    if early_stopping_patience is not None and eval_rows:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    return CAFTTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def format_head_metrics(metrics: dict, prefix: str = "eval_") -> str:
    losses = metrics.get(f"{prefix}loss_by_head") or []
    parts = []
    for k, loss in enumerate(losses):
        accuracy = metrics.get(f"{prefix}acc_head_{k}")
        parts.append(f"head {k}: loss {loss:.4f} top-1 {accuracy:.3f}" if accuracy is not None else f"head {k}: {loss:.4f}")
    return "; ".join(parts)


# Pipeline ----------------------------------------------------------------------------------------


def split_rows(rows: list, fraction: float, seed: int, source: str) -> tuple[list, list]:
    """Split `rows` into (train, held-out) with round(fraction * len) held-out rows chosen by a seeded shuffle.

    Both parts keep the input order. Raises ValueError naming `source` when either part would be empty.
    """
    import random

    count = round(fraction * len(rows))
    if count < 1 or count >= len(rows):
        raise ValueError(
            f"{source}: --eval-fraction {fraction:g} of {len(rows)} rows leaves an empty training or held-out set; "
            "use more rows or another fraction"
        )
    held_out = set(random.Random(seed).sample(range(len(rows)), count))
    train = [row for index, row in enumerate(rows) if index not in held_out]
    evaluation = [row for index, row in enumerate(rows) if index in held_out]
    return train, evaluation


def load_data(config: TrainConfig, tokenizer):
    """Build the tokenized train and held-out rows (the embedded HumanEval split when no file is given)."""
    from .assets import default_data_paths
    from .chat import build_dataset

    train_source, eval_source = config.train_set, config.eval_set
    if train_source is None:
        default_train, default_eval = default_data_paths()
        train_source = str(default_train)
        if eval_source is None:
            eval_source = str(default_eval)
    fields = dict(
        prompt_field=config.prompt_field, response_field=config.response_field, system_field=config.system_field,
        keep_truncated=config.keep_truncated,
    )
    train_rows, train_stats = build_dataset(
        train_source, tokenizer, config.model_max_length, size=config.size, seed=config.seed, **fields
    )
    logger.info("Training data %s: %s", train_source, train_stats.summary())
    if config.eval_fraction is not None:
        train_rows, eval_rows = split_rows(train_rows, config.eval_fraction, config.seed, train_source)
        logger.info(
            "Held out %d of the %d kept training rows (--eval-fraction %g, seed %d); training on the other %d",
            len(eval_rows), len(eval_rows) + len(train_rows), config.eval_fraction, config.seed, len(train_rows),
        )
        return train_rows, eval_rows, train_stats, None
    eval_rows, eval_stats = [], None
    if eval_source:
        eval_rows, eval_stats = build_dataset(
            eval_source, tokenizer, config.model_max_length, size=config.eval_size, seed=config.seed, **fields
        )
        logger.info("Held-out data %s: %s", eval_source, eval_stats.summary())
    return train_rows, eval_rows, train_stats, eval_stats


def pretrain_heads(
    model, tokenizer, config: TrainConfig, output_dir: Path, train_rows, eval_rows, collator, resume: bool = False
) -> dict:
    """Stage 1 on the task data: only the heads' own parameters learn, the trunk runs under no_grad.

    Checkpoints (every --save-steps, and on SIGINT/SIGTERM) go to `<output_dir>/heads_pretraining`;
    with `resume`, the stage continues from the newest complete one there.
    """
    state: CAFTState = model.caft_state
    previous_mode = state.mode
    state.mode = "heads_only"
    trainable = set_trainable(model, lambda name: name.startswith("caft_heads."))
    logger.info("Heads pretraining: %d trainable parameters, 1 epoch, learning rate %g", trainable, config.heads_pretrain_learning_rate)
    args = training_arguments(
        config,
        output_dir / "heads_pretraining",
        learning_rate=config.heads_pretrain_learning_rate,
        num_train_epochs=1,
        max_steps=-1,
        per_device_train_batch_size=config.per_device_batch_size * config.pretrain_bs_multiplier,
        save_strategy="steps" if config.save_steps else "no",
        eval_strategy="no",
        load_best_model_at_end=False,
        **checkpointing_arguments(False),
        has_eval=False,
    )
    trainer = make_trainer(model, tokenizer, args, train_rows, [], collator)
    checkpoint = find_resume_checkpoint(Path(args.output_dir)) if resume else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.args.should_save:
        save_heads(model.caft_heads, output_dir / "heads_pretrained")
    trainer.accelerator.wait_for_everyone()
    state.mode = previous_mode
    return result.metrics


def run_train(config: TrainConfig) -> TrainResult:
    """Run the whole `caft train` pipeline and return the before/after held-out metrics."""
    from transformers import set_seed

    from .collator import make_collator
    from .loading import load_model, load_tokenizer
    from .packing import check_packing_attention, pack_datasets

    start = time.time()
    output_dir = resolve_output_dir(config)
    is_main = int(os.environ.get("RANK", "0")) == 0
    previous = read_previous_config(config, output_dir)
    set_seed(config.seed)

    tokenizer = load_tokenizer(config.model_name_or_path)
    train_rows, eval_rows, train_stats, eval_stats = load_data(config, tokenizer)
    if config.packing:
        train_rows, eval_rows = pack_datasets(config, train_rows, eval_rows)
    collator = make_collator(tokenizer)
    model = load_model(config.model_name_or_path, config.dtype, config.load_in_8bit, config.load_in_4bit)
    model.config.use_cache = False
    if config.packing:
        check_packing_attention(model, config)
    setup_heads(model, config, published_default=True)
    write_run_config(config, output_dir, previous, is_main)
    if tokenizer.chat_template and is_main:
        (output_dir / "chat_template.jinja").write_text(tokenizer.chat_template)

    result = TrainResult(output_dir=output_dir)
    stage = _resumed_stage(config, output_dir)
    if stage == STAGE_FINETUNING and config.heads_pretraining:
        heads_dir = output_dir / "heads_pretrained"
        logger.info("Heads pretraining finished in the interrupted run; loading its heads from %s", heads_dir)
        _config, weights, source = read_heads_file(heads_dir)
        load_heads_state(model.caft_heads, weights, source)
    elif config.heads_pretraining:
        write_run_stage(output_dir, STAGE_HEADS_PRETRAINING)
        result.train_metrics["heads_pretraining"] = pretrain_heads(
            model, tokenizer, config, output_dir, train_rows, eval_rows, collator, resume=stage is not None
        )
    write_run_stage(output_dir, STAGE_FINETUNING, heads_pretrained=config.heads_pretraining)

    # Stage 2 starts from the same random state whether or not stage 1 ran in this process, so a run
    # resumed after stage 1 initialises LoRA exactly as the uninterrupted run did.
    set_seed(config.seed)
    model = apply_finetune_method(model, config)
    trainable, total = count_parameters(model)
    logger.info("Stage 2 (%s, %s): %d of %d parameters trainable", config.mode, config.finetune_method, trainable, total)
    args = training_arguments(config, output_dir, has_eval=bool(eval_rows))
    trainer = make_trainer(model, tokenizer, args, train_rows, eval_rows, collator, config.early_stopping_patience)

    if eval_rows and config.eval_before_training and not config.continue_from_checkpoint:
        result.metrics_before = trainer.evaluate(metric_key_prefix="eval")
        logger.info("Held-out before fine-tuning: %s", format_head_metrics(result.metrics_before))

    resume = find_resume_checkpoint(output_dir) if config.continue_from_checkpoint else None
    train_output = trainer.train(resume_from_checkpoint=resume)
    result.train_metrics["finetuning"] = train_output.metrics
    if eval_rows:
        result.metrics_after = _final_eval_metrics(trainer) or trainer.evaluate(metric_key_prefix="eval")
        logger.info("Held-out after fine-tuning: %s", format_head_metrics(result.metrics_after))

    save_outputs(trainer, model, tokenizer, config, output_dir)
    result.wall_time_s = time.time() - start
    result.peak_memory_mb = peak_memory_mb()
    metrics = {
        "eval_before": result.metrics_before,
        "eval": result.metrics_after,
        "train": result.train_metrics,
        "data": {"train": train_stats.__dict__, "eval": eval_stats.__dict__ if eval_stats else None},
        "wall_time_s": round(result.wall_time_s, 1),
        "peak_memory_mb": round(result.peak_memory_mb, 1),
    }
    metrics.update({key: value for key, value in result.metrics_after.items()})
    if trainer.args.should_save:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    from .summary import finish_run

    finish_run(trainer, config, result, train_rows, "caft train")
    return result


def save_outputs(trainer, model, tokenizer, config: TrainConfig, output_dir: Path) -> None:
    """Write the fine-tuned adapter or model (no head keys), the heads folder and, if asked, the merged model."""
    trainer.save_model(str(output_dir))
    if not trainer.args.should_save:
        return
    causal_lm = unwrap_causal_lm(model)
    if len(causal_lm.caft_heads):
        save_heads(causal_lm.caft_heads, output_dir / "heads")
    heads_checkpoint = output_dir / "caft_heads.safetensors"
    if heads_checkpoint.exists():
        heads_checkpoint.unlink()  # only checkpoints need the raw heads state; the heads/ folder is the artifact
    if config.caft_save_combined_model and config.finetune_method == "lora":
        from .export import merge_adapter_model

        merge_adapter_model(model, tokenizer, output_dir / "merged")


def _final_eval_metrics(trainer) -> dict | None:
    """Reuse the Trainer's own evaluation when it ran at the final step (and no best model was reloaded)."""
    if trainer.args.load_best_model_at_end:
        return None
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            return dict(entry) if entry.get("step") == trainer.state.global_step else None
    return None


CONFIG_NAME = "config.yaml"
RESUME_FIXED_SETTINGS = (
    "model_name_or_path", "mode", "finetune_method", "finetune_heads", "freeze_unembedding", "heads_pretraining",
    "caft_num_heads", "caft_num_layers", "head_arch", "head_wiring", "separate_unembed", "lora_r", "lora_alpha",
    "lora_target_modules", "heads_r_multiplier",
)
"""Settings that shape the trained parameters, so a run resumes only with the values it was started with."""
RESUME_FREE_SETTINGS = ("continue_from_checkpoint", "overwrite_output_dir", "output_dir")


def read_previous_config(config: TrainConfig, output_dir: Path) -> dict | None:
    """Return the settings of the interrupted run (its config.yaml) when resuming, else None.

    Every process reads it at the start, long before the main process writes the new one after
    loading the model, so all of them compare against the same settings.
    """
    path = output_dir / CONFIG_NAME
    if not config.continue_from_checkpoint or not path.is_file():
        return None
    import yaml

    try:
        previous = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML ({error}); restore it or start a new --output-dir.") from error
    return previous if isinstance(previous, dict) else None


def write_run_config(config: TrainConfig, output_dir: Path, previous: dict | None, is_main: bool) -> None:
    """Check a resumed run's settings against the interrupted run's, then write config.yaml (main process only).

    Settings that shape the parameters must match, or ValueError. Other changes (steps, learning
    rate, data) get a warning, and the interrupted run's file is kept as config-before-resume.yaml.
    """
    current = config.to_dict()
    changed = {
        name: (previous[name], value) for name, value in current.items()
        if previous is not None and name in previous and previous[name] != value and name not in RESUME_FREE_SETTINGS
    }
    fixed = {name: values for name, values in changed.items() if name in RESUME_FIXED_SETTINGS}
    if fixed:
        listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in fixed.items())
        raise ValueError(
            f"The run in {output_dir} was started with other settings ({listed}). Resume it with the settings in "
            f"{output_dir / CONFIG_NAME}, or start a new --output-dir."
        )
    if changed:
        listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
        logger.warning(
            "Resuming %s with changed settings: %s. The learning-rate schedule and s(t) follow the new values from the "
            "checkpoint on. The earlier settings are kept in config-before-resume.yaml.", output_dir, listed,
        )
    if not is_main:
        return
    if changed:
        (output_dir / CONFIG_NAME).replace(output_dir / "config-before-resume.yaml")
    save_config(config, output_dir / CONFIG_NAME)
    logger.info("Configuration:\n%s", (output_dir / CONFIG_NAME).read_text())


def find_resume_checkpoint(output_dir: Path) -> str | None:
    """Return the newest complete checkpoint in `output_dir`, skipping unfinished or foreign ones with a warning."""
    last = newest_checkpoint(output_dir)
    if last is None:
        logger.warning("No complete checkpoint found in %s; training starts from the beginning.", output_dir)
    else:
        logger.info("Resuming from %s", last)
    return last


def _resumed_stage(config: TrainConfig, output_dir: Path) -> str | None:
    """Return the stage the interrupted run reached (None for a new run), after checking it against -hpretrain."""
    if not config.continue_from_checkpoint:
        return None
    recorded = read_run_stage(output_dir)
    if recorded is None:
        return None
    stage = recorded["stage"]
    pretrained = stage == STAGE_HEADS_PRETRAINING or recorded.get("heads_pretrained", False)
    if pretrained != bool(config.heads_pretraining):
        flag = "with" if pretrained else "without"
        raise ValueError(
            f"The run in {output_dir} was started {flag} --heads-pretraining ({RUN_STAGE_NAME} records stage {stage!r}); "
            f"resume it {flag} --heads-pretraining, or start a new --output-dir."
        )
    return stage
