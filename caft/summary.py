"""End-of-run reporting: `summary.md` and the loss plots.

`finish_run` is called at the end of `caft train` and `caft train-heads` on the main process. It
writes `<run>/summary.md` (configuration, data counts, steps, time, tokens trained and tokens/s,
peak memory, per-head held-out metrics before and after), draws the plots of `caft.plots`, and logs
the summary with a final line that lists the files.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from .chat import IGNORE_INDEX
from .plots import LOG_NAME, plot_run_safely, read_loss_log

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.md"
CONFIG_KEYS = (
    "model_name_or_path", "mode", "finetune_method", "train_set", "eval_set", "size", "eval_size", "eval_fraction",
    "keep_truncated", "model_max_length", "packing", "caft_num_heads", "caft_num_layers", "head_arch", "head_wiring",
    "separate_unembed", "auxiliary_heads_dir", "heads_pretraining", "finetune_heads", "caft_heads_coefficient",
    "caft_decay_coefficient", "caft_scheduler", "learning_rate", "epochs", "max_steps", "per_device_batch_size",
    "gradient_accumulation_steps", "lora_r", "lora_alpha", "seed", "report_to",
)
"""Settings listed in summary.md. The config.yaml beside it contains all of them."""


@dataclass
class TokenCount:
    """Tokens that one training stage processed: all non-padding tokens and the labelled ones."""

    total: int
    labelled: int
    exact: bool
    """True when the stage ran whole epochs, so every row was seen exactly `epochs` times."""


def count_trained_tokens(rows: list[dict], epochs: float) -> TokenCount:
    """Count the tokens of `epochs` passes over `rows`. A partial epoch is scaled by its fraction, an estimate.

    NOTE: with several processes the sampler may repeat a few rows to split the data evenly; those are not counted.
    """
    total = sum(len(row["input_ids"]) for row in rows)
    labelled = sum(sum(label != IGNORE_INDEX for label in row["labels"]) for row in rows)
    exact = abs(epochs - round(epochs)) < 1e-6
    return TokenCount(total=round(total * epochs), labelled=round(labelled * epochs), exact=exact)


def eval_seconds_in_training(csv_rows: list[dict]) -> float:
    """Seconds spent in evaluations that ran inside the last `trainer.train()` call, from loss_log.csv rows.

    Those evaluations lie between the first training log of that call and its final `train_runtime` row, so the
    evaluation before training and the one after it are not counted.
    """
    end = max((i for i, row in enumerate(csv_rows) if "train_runtime" in row), default=None)
    if end is None:
        return 0.0
    start = max((i for i, row in enumerate(csv_rows[:end]) if "train_runtime" in row), default=-1) + 1
    first_train = next((i for i in range(start, end) if csv_rows[i]["split"] == "train" and "loss" in csv_rows[i]), end)
    return sum(row.get("runtime", 0.0) for row in csv_rows[first_train:end] if row["split"] == "eval")


def _stage_metrics(train_metrics: dict) -> dict[str, dict]:
    """Map stage name -> the Trainer's train metrics, for both layouts of TrainResult.train_metrics."""
    if "train_runtime" in train_metrics:
        return {"heads training": train_metrics}
    names = {"heads_pretraining": "heads pretraining", "finetuning": "fine-tuning"}
    return {names.get(key, key): value for key, value in train_metrics.items() if isinstance(value, dict)}


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return "-" if value is None else str(value)


def _data_lines(data: dict) -> list[str]:
    lines = []
    for split in ("train", "eval"):
        stats = data.get(split)
        if not stats:
            continue
        skipped = stats.get("skipped") or {}
        text = f"- {split}: read {stats['rows_read']} rows, kept {stats['rows_kept']}"
        if skipped:
            reasons = "; ".join(f"{reason}: {count}" for reason, count in skipped.items())
            text += f", skipped {sum(skipped.values())} ({reasons})"
        lines.append(text)
    return lines


def _head_table(before: dict, after: dict) -> list[str]:
    heads = sorted({int(key.rsplit("_", 1)[1]) for key in {**before, **after} if key.startswith("eval_loss_head_")})
    if not heads:
        return ["No held-out set, so no per-head metrics."]
    lines = [
        "Head k predicts token t+1+k; head 0 is the model's own next-token head.",
        "",
        "| head | loss before | loss after | top-1 before | top-1 after | targets |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def cell(metrics: dict, key: str, digits: int) -> str:
        value = metrics.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"

    for k in heads:
        targets = after.get(f"eval_targets_head_{k}", before.get(f"eval_targets_head_{k}", "-"))
        lines.append(
            f"| {k} | {cell(before, f'eval_loss_head_{k}', 4)} | {cell(after, f'eval_loss_head_{k}', 4)} "
            f"| {cell(before, f'eval_acc_head_{k}', 3)} | {cell(after, f'eval_acc_head_{k}', 3)} | {targets} |"
        )
    return lines


def build_summary(command: str, config, metrics: dict, stages: dict[str, dict], tokens: dict[str, TokenCount],
                  eval_seconds: float, global_step: int, plots: list[str]) -> str:
    """Return the Markdown text of summary.md. `plots` are PNG paths relative to the run folder."""
    settings = config.to_dict()
    lines = [f"# {command} run summary", "", "## Configuration", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {_format_value(settings[key])} |" for key in CONFIG_KEYS if key in settings]
    lines += ["", "All settings: `config.yaml`.", "", "## Data", ""]
    lines += _data_lines(metrics.get("data") or {}) or ["- no data counts recorded"]

    lines += ["", "## Training", "", f"- optimizer steps: {global_step}"]
    lines.append(f"- wall time: {metrics.get('wall_time_s', 0):.1f} s (loading, evaluation and saving included)")
    resumed = bool(getattr(config, "continue_from_checkpoint", False))
    for name, stage in stages.items():
        runtime = stage.get("train_runtime", 0.0)
        epochs = stage.get("epoch", 0)
        lines.append(f"- {name}: {epochs:g} epoch{'' if epochs == 1 else 's'} in {runtime:.1f} s")
        count = tokens.get(name)
        if count is None:
            continue
        approx = "" if count.exact else "about "
        lines.append(f"  - tokens trained: {approx}{count.total:,} ({approx}{count.labelled:,} labelled)")

        # Heads pretraining logs into its own folder and never evaluates.
        stage_eval_seconds = 0.0 if name == "heads pretraining" else eval_seconds
        seconds = runtime - stage_eval_seconds
        if resumed:
            lines.append("  - throughput: not computed, because the tokens cover the whole run and the time only this session")
        elif seconds > 0:
            note = f", excluding {stage_eval_seconds:.1f} s of evaluation during training" if stage_eval_seconds else ""
            lines.append(f"  - throughput: {count.total / seconds:,.0f} tokens/s, {count.labelled / seconds:,.0f} labelled tokens/s{note}")
    lines.append(f"- peak memory: {metrics.get('peak_memory_mb', 0):,.0f} MiB")

    lines += ["", "## Held-out metrics", ""]
    lines += _head_table(metrics.get("eval_before") or {}, metrics.get("eval") or {})
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(name).stem}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def finish_run(trainer, config, result, train_rows: list[dict], command: str) -> Path | None:
    """Write the plots and summary.md of a finished run and log them, on the main process only; return the summary path."""
    if not trainer.args.should_save:
        return None
    output_dir = Path(result.output_dir)
    metrics_path = output_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    stages = _stage_metrics(result.train_metrics)
    tokens = {name: count_trained_tokens(train_rows, float(stage.get("epoch", 0.0))) for name, stage in stages.items()}
    eval_seconds = 0.0
    if (output_dir / LOG_NAME).is_file():
        try:
            eval_seconds = eval_seconds_in_training(read_loss_log(output_dir / LOG_NAME))
        except ValueError as error:
            logger.warning("Could not read %s for the evaluation time: %s", output_dir / LOG_NAME, error)
    plots = [str(path.relative_to(output_dir)) for path in plot_run_safely(output_dir)]
    text = build_summary(command, config, metrics, stages, tokens, eval_seconds, trainer.state.global_step, plots)
    summary_path = output_dir / SUMMARY_NAME
    summary_path.write_text(text)
    logger.info("Run summary:\n%s", text)
    logger.info("Wrote %s to %s", ", ".join([SUMMARY_NAME, *plots]), output_dir)
    return summary_path
