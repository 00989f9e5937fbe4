"""Loss and accuracy plots of a run, drawn from its `loss_log.csv`.

    caft plot runs/my-run

Writes `loss.png` (total loss, and the held-out `real_eval_loss` when logged), `head_loss.png` and
`head_accuracy.png` (one panel per head, head 0 being the model's own next-token head) into the run
folder, train and eval against the optimizer step. A `heads_pretraining/loss_log.csv` of
`caft train -hpretrain` gets its own plots in that folder. `caft train` and `caft train-heads` call
this at the end of training. matplotlib comes with the `plots` extra: `pip install 'caft[plots]'`.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

LOG_NAME = "loss_log.csv"
SUBRUN_NAMES = ("heads_pretraining",)
INSTALL_HINT = "pip install 'caft[plots]'"
SPLIT_STYLES = {"train": {"color": "tab:blue", "linewidth": 1.2}, "eval": {"color": "tab:orange", "marker": "o", "markersize": 3}}


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


def read_loss_log(path: str | Path) -> list[dict]:
    """Read `loss_log.csv` into rows of `{column: float}` plus the `split`. Empty cells are left out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run folder written by `caft train` or `caft train-heads`.")
    try:
        return _read_rows(path)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid UTF-8 text ({error}). Restore the loss_log.csv that `caft train` wrote."
        ) from error


def _read_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "step" not in reader.fieldnames or "split" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a header with the columns step and split, got {reader.fieldnames}.")
        for line_number, raw in enumerate(reader, start=2):
            row = {"split": raw["split"]}
            for key, value in raw.items():
                if key == "split" or value in (None, ""):
                    continue
                try:
                    row[key] = float(value)
                except ValueError:
                    raise ValueError(f"{path}, line {line_number}: invalid value {value!r} in column {key}: expected a number.") from None
            rows.append(row)
    return rows


def series(rows: list[dict], split: str, column: str) -> tuple[list[float], list[float]]:
    """Return (steps, values) of one column for one split, skipping rows without a finite value."""
    steps, values = [], []
    for row in rows:
        value = row.get(column)
        if row["split"] == split and value is not None and math.isfinite(value):
            steps.append(row["step"])
            values.append(value)
    return steps, values


def head_numbers(rows: list[dict]) -> list[int]:
    """Return the head indices k that have a `loss_head_k` column, in order."""
    found = set()
    for row in rows:
        for key in row:
            match = re.fullmatch(r"loss_head_(\d+)", key)
            if match:
                found.add(int(match.group(1)))
    return sorted(found)


def _new_figure(panels: int, title: str):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(f"Plots need matplotlib, which is not installed: {INSTALL_HINT}.") from None
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(4.5 * columns, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas renders PNG without touching pyplot's global backend
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[panels:]:
        extra.set_visible(False)
    figure.suptitle(title)
    return figure, axes[:panels]


def _draw(axis, rows: list[dict], column: str, title: str, ylabel: str) -> bool:
    drawn = False
    for split, style in SPLIT_STYLES.items():
        steps, values = series(rows, split, column)
        if values:
            axis.plot(steps, values, label=split, **style)
            drawn = True
    axis.set_title(title)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if drawn:
        axis.legend()
    return drawn


def draw_figures(rows: list[dict], title: str) -> dict[str, object]:
    """Build the figures of one run's log rows, keyed by PNG file name."""
    figures = {}
    has_real = any("real_eval_loss" in row for row in rows)
    figure, axes = _new_figure(2 if has_real else 1, f"{title}: total loss")
    _draw(axes[0], rows, "loss", "loss", "loss")
    if has_real:
        _draw(axes[1], rows, "real_eval_loss", "real_eval_loss = sum_k 0.8^k loss_k", "loss")
    figures["loss.png"] = figure

    heads = head_numbers(rows)
    if heads:
        for column, name, ylabel in (("loss_head", "head_loss.png", "cross-entropy"), ("acc_head", "head_accuracy.png", "top-1 accuracy")):
            figure, axes = _new_figure(len(heads), f"{title}: {ylabel} per head (head k predicts token t+1+k)")
            for axis, k in zip(axes, heads):
                _draw(axis, rows, f"{column}_{k}", f"head {k}", ylabel)
            figures[name] = figure
    return figures


def plot_loss_log(csv_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the plots of one `loss_log.csv` into `out_dir` (default: its folder) and return their paths."""
    csv_path = Path(csv_path)
    out_dir = Path(out_dir) if out_dir is not None else csv_path.parent
    written = []
    for name, figure in draw_figures(read_loss_log(csv_path), out_dir.name).items():
        figure.savefig(out_dir / name, dpi=100)
        written.append(out_dir / name)
    return written


def plot_run(run_dir: str | Path) -> list[Path]:
    """Plot a run folder's `loss_log.csv` and those of its stages (heads pretraining); return the PNG paths."""
    run_dir = Path(run_dir)
    logs = [run_dir / LOG_NAME] + [run_dir / name / LOG_NAME for name in SUBRUN_NAMES if (run_dir / name / LOG_NAME).is_file()]
    written = []
    for path in logs:
        written += plot_loss_log(path)
    return written


def plot_run_safely(run_dir: str | Path) -> list[Path]:
    """Plot a run at the end of training: a missing matplotlib or a bad log is a warning, never an error."""
    try:
        return plot_run(run_dir)
    except PlotsUnavailable as error:
        logger.warning("No plots written: %s", error)
    except (OSError, ValueError) as error:
        logger.warning("No plots written for %s: %s", run_dir, error)
    return []


def register(subparsers) -> None:
    """Add the `plot` subcommand."""
    parser = subparsers.add_parser(
        "plot",
        help="Draw loss and per-head accuracy plots (PNG) of a run from its loss_log.csv.",
        description="Write loss.png, head_loss.png and head_accuracy.png into RUN_DIR, train and eval against the step.",
    )
    parser.add_argument("run_dir", help="A run folder of `caft train` or `caft train-heads` (holding loss_log.csv).")
    parser.set_defaults(handler=run_plot_command)


def run_plot_command(args: argparse.Namespace) -> int:
    try:
        written = plot_run(args.run_dir)
    except PlotsUnavailable as error:
        print(f"caft plot: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
