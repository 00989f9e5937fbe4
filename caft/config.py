"""Training configuration: one typed dataclass, its command-line flags (with the original short forms), YAML files.

Each field's docstring-like `help` feeds `caft train --help`. Precedence: dataclass default <
`--config FILE.yaml` < command-line flags. The resolved configuration is printed at start and
saved as `config.yaml` beside the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .heads import HEAD_ARCHS, HEAD_WIRINGS
from .loss import parse_sine_ratio


def option(default, *flags: str, help: str, choices=None, **extra):
    """A dataclass field with its command-line flags and help text."""
    metadata = {"flags": flags, "help": help, "choices": choices, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of `caft train` and `caft train-heads`."""

    # Model
    model_name_or_path: str = option(
        "smollm2", "--model-name-or-path", "--model", "-model",
        help="Base model: a hub id, a local folder, a .gguf file, or 'smollm2' for the embedded "
        "SmolLM2-135M-Instruct (default: %(default)s).",
    )
    model_max_length: int = option(
        1024, "--model-max-length", "-maxlen", help="Maximum tokens per training row; longer rows are truncated (default: %(default)s)."
    )
    dtype: str = option(
        "float32", "--dtype", choices=("float32", "bfloat16", "float16", "auto"),
        help="Weight dtype when loading the model (default: %(default)s).",
    )
    load_in_8bit: bool = option(False, "--load-in-8bit", "-8bit", help="Load the base model in 8 bit (bitsandbytes, CUDA only).")
    load_in_4bit: bool = option(False, "--load-in-4bit", "-4bit", help="Load the base model in 4 bit (bitsandbytes, CUDA only).")
    gradient_checkpointing: bool = option(
        False, "--gradient-checkpointing", "-grad-ckpt", help="Recompute activations in the backward pass to save memory."
    )

    # Fine-tuning method
    mode: str = option(
        "caft", "--mode", "-m", choices=("caft", "default"),
        help="'caft' adds the auxiliary-head loss; 'default' is plain next-token fine-tuning through the same "
        "pipeline, the baseline (default: %(default)s).",
    )
    finetune_method: str = option(
        "lora", "--finetune-method", "-ftm", choices=("lora", "sft"),
        help="'lora' trains LoRA adapters; 'sft' trains all weights (default: %(default)s).",
    )
    freeze_unembedding: bool = option(
        False, "--freeze-unembedding", "-fr-unembed",
        help="With -ftm sft, keep lm_head frozen (and the input embedding when they are tied).",
    )
    finetune_heads: bool = option(
        False, "--finetune-heads", "-ft-heads",
        help="Also train the auxiliary heads in stage 2 (LoRA on the heads with -ftm lora, full weights with sft).",
    )
    heads_pretraining: bool = option(
        False, "--heads-pretraining", "-hpretrain",
        help="Before fine-tuning, train only the heads for 1 epoch on the task data with the base model frozen.",
    )
    pretrain_bs_multiplier: int = option(
        1, "--pretrain-bs-multiplier", "-heads-bs-multi",
        help="Heads pretraining uses per-device batch size x this factor (default: %(default)s).",
    )
    heads_pretrain_learning_rate: float = option(
        1e-4, "--heads-pretrain-learning-rate", help="Learning rate of heads pretraining (default: %(default)s)."
    )

    # Data
    train_set: str | None = option(
        None, "--train-set", "-ts",
        help="Training data, .jsonl or .json (default: the embedded HumanEval split).",
    )
    eval_set: str | None = option(None, "--eval-set", "-es", help="Held-out data, .jsonl or .json (default: the embedded HumanEval split).")
    size: int | None = option(None, "--size", "-sz", help="Use at most this many training rows, after a seeded shuffle (default: all).")
    eval_size: int | None = option(None, "--eval-size", "-esz", help="Use at most this many held-out rows (default: all).")
    eval_fraction: float | None = option(
        None, "--eval-fraction", "-efrac",
        help="Hold out this fraction of the training rows (after --size, seeded) as the held-out set, instead of --eval-set.",
    )
    prompt_field: str | None = option(None, "--prompt-field", help="JSON field holding the prompt, for data in no chat format (e.g. question).")
    response_field: str | None = option(None, "--response-field", help="JSON field holding the reply, for data in no chat format (e.g. answer).")
    system_field: str | None = option(None, "--system-field", help="Optional JSON field holding a system prompt.")
    keep_truncated: bool = option(
        False, "--keep-truncated",
        help="Train on rows of status TRUNCATED (replies `caft distill` cut at --max-new-tokens) without an end-of-turn "
        "label, instead of skipping them.",
    )
    packing: bool = option(False, "--packing", help="Pack several conversations into each row of up to --model-max-length tokens.")

    # Optimisation
    learning_rate: float = option(1e-4, "--learning-rate", "-lr", help="Peak learning rate (default: %(default)s).")
    epochs: float = option(1.0, "--epochs", "-e", help="Training epochs (default: %(default)s).")
    max_steps: int = option(-1, "--max-steps", help="Stop after this many optimizer steps; -1 runs all epochs (default: %(default)s).")
    per_device_batch_size: int = option(4, "--per-device-batch-size", "-micro-bs", help="Rows per micro-batch per process (default: %(default)s).")
    gradient_accumulation_steps: int = option(
        1, "--gradient-accumulation-steps", "-grad-acc", help="Micro-batches per optimizer step (default: %(default)s)."
    )
    weight_decay: float = option(0.0, "--weight-decay", "-wd", help="AdamW weight decay (default: %(default)s).")
    optimizer: str = option("adamw_torch", "--optimizer", "-optim", help="A transformers optimizer name (default: %(default)s).")
    lr_scheduler_type: str = option("cosine", "--lr-scheduler-type", "-lr-sched", help="A transformers LR schedule name (default: %(default)s).")
    warmup_steps: int = option(0, "--warmup-steps", "-warmup", help="Linear warm-up, in optimizer steps (default: %(default)s).")
    seed: int = option(42, "--seed", help="Random seed for data order, dropout and initialisation (default: %(default)s).")

    # CAFT
    caft_num_heads: int = option(4, "--caft-num-heads", "-heads", help="Auxiliary heads; head k predicts token t+1+k (default: %(default)s).")
    caft_num_layers: int = option(1, "--caft-num-layers", "-layers", help="Decoder layers per transformer head (default: %(default)s).")
    caft_heads_coefficient: float = option(
        0.01, "--caft-heads-coefficient", "-hcoef", help="beta, the weight of the auxiliary losses (default: %(default)s)."
    )
    caft_decay_coefficient: float = option(
        0.8, "--caft-decay-coefficient", "-decay", help="gamma; head k's loss is weighted by gamma^k (default: %(default)s)."
    )
    caft_scheduler: str = option(
        "rsine", "--caft-scheduler", "-sched",
        help="Schedule s(t) of the auxiliary loss: constant, linear, sine, rsine or sine_<r> (default: %(default)s).",
    )
    auxiliary_heads_dir: str | None = option(
        None, "--auxiliary-heads-dir", "-hdir",
        help="Trained heads: a heads folder, an original heads.pth file or a hub repo id (default: copies of the last layer).",
    )
    separate_unembed: bool = option(
        False, "--separate-unembed", "-sepunembed", help="Give each head its own unembedding, initialised from lm_head."
    )
    head_arch: str = option("transformer", "--head-arch", "-harch", choices=HEAD_ARCHS, help="Head architecture (default: %(default)s).")
    head_wiring: str = option(
        "sibling", "--head-wiring", choices=HEAD_WIRINGS,
        help="'sibling' feeds heads the last decoder layer's inputs; 'reference' matches the original CAFT code (default: %(default)s).",
    )
    loss_chunk_size: int = option(1024, "--loss-chunk-size", help="Positions per chunk of the chunked cross-entropy (default: %(default)s).")

    # LoRA
    lora_r: int = option(8, "--lora-r", "-r", help="LoRA rank (default: %(default)s).")
    lora_alpha: int = option(16, "--lora-alpha", "-a", help="LoRA alpha (default: %(default)s).")
    lora_dropout: float = option(0.05, "--lora-dropout", "-dropout", help="LoRA dropout probability (default: %(default)s).")
    lora_target_modules: list[str] = option(
        ["all-linear"], "--lora-target-modules", "-lora-target", nargs="+",
        help="Module names that get LoRA; 'all-linear' means every linear layer of the decoder except lm_head (default: %(default)s).",
    )
    heads_r_multiplier: int = option(1, "--heads-r-multiplier", "-r-multi", help="With -ft-heads, the heads' LoRA rank is r x this (default: %(default)s).")

    # Outputs, logging, checkpoints
    output_dir: str | None = option(None, "--output-dir", help="Run folder (default: runs/<model>-<mode>-<time>); an existing non-empty folder is an error unless resuming.")
    overwrite_output_dir: bool = option(
        False, "--overwrite-output-dir",
        help="Start over in an existing non-empty output folder: the earlier run's checkpoints and loss log are deleted, "
        "its other outputs are replaced as the new run writes them.",
    )
    continue_from_checkpoint: bool = option(
        False, "--continue-from-checkpoint", "-cont-ckpt", help="Resume from the newest valid checkpoint in --output-dir."
    )
    caft_save_combined_model: bool = option(
        False, "--caft-save-combined-model", "-save-combined", help="With LoRA, also write the merged full model to <output-dir>/merged."
    )
    logging_steps: int = option(10, "--logging-steps", help="Log every N optimizer steps (default: %(default)s).")
    eval_steps: int | None = option(None, "--eval-steps", help="Evaluate every N steps (default: at the end of each epoch).")
    save_steps: int | None = option(None, "--save-steps", help="Save a checkpoint every N steps (default: at the end of each epoch).")
    save_total_limit: int | None = option(2, "--save-total-limit", help="Keep at most this many checkpoints (default: %(default)s).")
    early_stopping_patience: int | None = option(
        None, "--early-stopping-patience", help="Stop after this many evaluations without improvement of eval_loss (default: off)."
    )
    report_to: str = option("none", "--report-to", help="none, tensorboard, wandb or mlflow (default: %(default)s).")
    eval_before_training: bool = option(True, "--eval-before-training", help="Evaluate once before training, for a before/after comparison.")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Reject invalid values and unsupported combinations before any work starts."""
        if self.caft_scheduler not in ("constant", "linear", "sine", "rsine"):
            if not self.caft_scheduler.startswith("sine_"):
                raise ValueError(
                    f"--caft-scheduler {self.caft_scheduler!r} is not valid: use constant, linear, sine, rsine or sine_<r>."
                )
            parse_sine_ratio(self.caft_scheduler)
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if str(item.type).startswith("float") and value is not None and not math.isfinite(value):
                raise ValueError(f"{item.metadata['flags'][0]} must be a finite number, got {value}.")
        checks = [
            (self.model_max_length >= 2, "--model-max-length must be at least 2"),
            (self.per_device_batch_size >= 1, "--per-device-batch-size must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be at least 1"),
            (self.pretrain_bs_multiplier >= 1, "--pretrain-bs-multiplier must be at least 1"),
            (self.caft_num_heads >= 1 or self.mode == "default", "--caft-num-heads must be at least 1 in caft mode"),
            (self.caft_num_layers >= 1, "--caft-num-layers must be at least 1"),
            (self.learning_rate > 0, "--learning-rate must be positive"),
            (self.epochs > 0 or self.max_steps > 0, "--epochs must be positive (or set --max-steps)"),
            (self.lora_r >= 1, "--lora-r must be at least 1"),
            (self.lora_alpha > 0, "--lora-alpha must be positive (0 scales the adapter to nothing)"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be at least 0 and below 1"),
            (self.heads_r_multiplier >= 1, "--heads-r-multiplier must be at least 1"),
            (self.heads_pretrain_learning_rate > 0, "--heads-pretrain-learning-rate must be positive"),
            (self.caft_heads_coefficient >= 0, "--caft-heads-coefficient must be at least 0 (0 turns the heads' loss off)"),
            (self.caft_decay_coefficient >= 0, "--caft-decay-coefficient must be at least 0"),
            (self.weight_decay >= 0, "--weight-decay must be at least 0"),
            (self.warmup_steps >= 0, "--warmup-steps must be at least 0"),
            (self.max_steps == -1 or self.max_steps >= 1, "--max-steps must be at least 1, or -1 to run all epochs"),
            (self.logging_steps >= 1, "--logging-steps must be at least 1"),
            (self.eval_steps is None or self.eval_steps >= 1, "--eval-steps must be at least 1 (leave it out to evaluate each epoch)"),
            (self.save_steps is None or self.save_steps >= 1, "--save-steps must be at least 1 (leave it out to save each epoch)"),
            (self.save_total_limit is None or self.save_total_limit >= 1, "--save-total-limit must be at least 1"),
            (
                self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                "--early-stopping-patience must be at least 1",
            ),
            (self.loss_chunk_size >= 1, "--loss-chunk-size must be at least 1"),
            (not (self.load_in_8bit and self.load_in_4bit), "choose one of --load-in-8bit and --load-in-4bit"),
            (self.size is None or self.size >= 1, "--size must be at least 1"),
            (self.eval_size is None or self.eval_size >= 1, "--eval-size must be at least 1"),
            (self.eval_fraction is None or 0 < self.eval_fraction < 1, "--eval-fraction must be between 0 and 1"),
            (
                self.eval_fraction is None or self.eval_set is None,
                "--eval-fraction splits the --train-set file; give either it or --eval-set, not both",
            ),
            (
                self.eval_fraction is None or self.train_set is not None,
                "--eval-fraction splits the --train-set file; pass -ts FILE with it",
            ),
            (
                self.eval_fraction is None or self.eval_size is None,
                "--eval-size limits the --eval-set file and has no effect with --eval-fraction; drop --eval-size "
                "or lower --eval-fraction",
            ),
            (
                not (self.freeze_unembedding and self.finetune_method == "lora"),
                "--freeze-unembedding applies to -ftm sft; LoRA never trains lm_head",
            ),
            (
                self.report_to in ("none", "tensorboard", "wandb", "mlflow"),
                f"--report-to {self.report_to!r} is not supported; use none, tensorboard, wandb or mlflow",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_config_arguments(parser: argparse.ArgumentParser, config_class=TrainConfig) -> None:
    """Add one flag per dataclass field; defaults are suppressed so that only given flags override."""
    parser.add_argument("--config", help="A YAML file of settings; command-line flags override it.")
    for item in dataclasses.fields(config_class):
        meta = item.metadata
        kwargs = {"dest": item.name, "help": meta["help"], "default": argparse.SUPPRESS}
        if item.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parse_type(item.type)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("nargs"):
                kwargs["nargs"] = meta["nargs"]
        # %(default)s refers to the dataclass default, since argparse's own default is suppressed.
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        kwargs["help"] = kwargs["help"].replace("%(default)s", str(default))
        parser.add_argument(*meta["flags"], **kwargs)


def _parse_type(type_name):
    text = str(type_name)
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


def _coerce(value, type_name, where: str):
    """Convert a YAML value to its field's type; YAML reads 1e-4 (no dot) as a string, for example."""
    text = str(type_name)
    if text.startswith("list"):
        if isinstance(value, str):
            return [value]  # `lora_target_modules: q_proj` means one module, not its letters
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}.")
        return value
    if value is None or isinstance(value, bool):
        return value
    try:
        if text.startswith("int"):
            return int(value)
        if text.startswith("float"):
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}.") from None
    if text.startswith("bool"):
        raise ValueError(f"{where} must be true or false, got {value!r}.")
    return value


def load_config(args: argparse.Namespace, config_class=TrainConfig):
    """Build a config from defaults, an optional YAML file (`args.config`) and the given flags."""
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None)
    known = {item.name for item in dataclasses.fields(config_class)}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} not found.")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"Config file {path} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"Config file {path} must contain a mapping of setting names to values.")
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"Config file {path} has unknown settings {unknown}; see `caft train --help` for the names.")
        items = {item.name: item for item in dataclasses.fields(config_class)}
        for name, value in loaded.items():
            value = _coerce(value, items[name].type, f"{path}: {name}")
            choices = items[name].metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{path}: {name} must be one of {', '.join(map(str, choices))}, got {value!r}.")
            values[name] = value
    for name in known:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    return config_class(**values)


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
