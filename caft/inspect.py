"""`caft inspect-data`: show training rows exactly as the model will see them, before training.

    caft inspect-data ../shared/data/gsm8k/train.jsonl --prompt-field question --response-field answer -n 2

The shown rows go through `caft.chat.tokenize_conversation` and the training set (the whole file,
or the `--size` rows that `caft train` selects) through `caft.chat.build_dataset`, the functions
`caft train` uses. The counts printed are therefore the counts training uses, except with
--packing, which joins rows and drops the targets that cross a row border.
Trained tokens (label != -100) are printed in bold green on a terminal and between `[[` and `]]`
otherwise or with --no-color.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat import IGNORE_INDEX, build_dataset, tokenize_conversation
from .config import TrainConfig, load_config
from .data import DataStats, load_located_conversations
from .loss import count_targets

MARK_START, MARK_END = "[[", "]]"
COLOR_START, COLOR_END = "\x1b[1;32m", "\x1b[0m"
# Rows are cut here to measure their untruncated length; no real conversation is this long.
UNLIMITED_LENGTH = sys.maxsize


@dataclass
class ShownRow:
    """One row of the file as training sees it, plus its length before truncation."""

    location: str
    example: dict | None
    """`{"input_ids", "labels"}` from tokenize_conversation, or None when truncation leaves no label."""
    full_length: int
    """Tokens before the cut to the maximum length."""
    full_labelled: int
    """Labelled tokens before the cut."""
    head_targets: list[int] = field(default_factory=list)
    """Valid targets of head 0..K in this row (caft.loss.count_targets)."""


@dataclass
class FileReport:
    """Counts over every row of the file, from the same build_dataset call that training makes."""

    stats: DataStats
    total_tokens: int
    labelled_tokens: int
    longest_row: int
    rows_at_limit: int
    """Kept rows of exactly `max_length` tokens: cut by the limit, or that long before the cut."""
    head_targets: list[int]


def count_head_targets(labels: list[int], num_heads: int) -> list[int]:
    """Return the valid targets of heads 0..num_heads in one unpacked row."""
    return [int(count) for count in count_targets(torch.tensor([labels]), num_heads)]


def inspect_rows(source, tokenizer, max_length: int, num_heads: int, count: int, **fields) -> list[ShownRow]:
    """Tokenize the first `count` conversations of `source` in file order, dropped ones included."""
    located, _ = load_located_conversations(source, **fields)
    shown = []
    for location, messages in located[:count]:
        full = tokenize_conversation(tokenizer, messages, UNLIMITED_LENGTH)
        example = tokenize_conversation(tokenizer, messages, max_length)
        row = ShownRow(
            location=location,
            example=example,
            full_length=len(full["input_ids"]) if full else 0,
            full_labelled=_labelled(full["labels"]) if full else 0,
        )
        if example is not None:
            row.head_targets = count_head_targets(example["labels"], num_heads)
        shown.append(row)
    return shown


def inspect_file(source, tokenizer, max_length: int, num_heads: int, size: int | None = None, seed: int = 0, **fields) -> FileReport:
    """Build the training set as `caft train` does (all rows, or `size` after a seeded shuffle) and count its tokens."""
    rows, stats = build_dataset(source, tokenizer, max_length, size=size, seed=seed, **fields)
    head_targets = [0] * (num_heads + 1)
    for row in rows:
        for k, value in enumerate(count_head_targets(row["labels"], num_heads)):
            head_targets[k] += value
    lengths = [len(row["input_ids"]) for row in rows]
    return FileReport(
        stats=stats,
        total_tokens=sum(lengths),
        labelled_tokens=sum(_labelled(row["labels"]) for row in rows),
        longest_row=max(lengths),
        rows_at_limit=sum(length == max_length for length in lengths),
        head_targets=head_targets,
    )


def render_tokens(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """Decode a row, marking each run of labelled tokens with ANSI colour or `[[...]]`."""
    start, end = (COLOR_START, COLOR_END) if color else (MARK_START, MARK_END)
    pieces = []
    run_start = 0
    for index in range(1, len(input_ids) + 1):
        run_ends = index == len(input_ids) or _is_labelled(labels[index]) != _is_labelled(labels[run_start])
        if not run_ends:
            continue
        text = tokenizer.decode(input_ids[run_start:index], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append(f"{start}{text}{end}" if _is_labelled(labels[run_start]) else text)
        run_start = index
    return "".join(pieces)


def format_row(tokenizer, row: ShownRow, number: int, max_length: int, color: bool) -> str:
    """Return the text block of one shown row: header, rendered tokens, per-head targets."""
    lines = []
    if row.example is None:
        lines.append(
            f"=== row {number} ({row.location}): DROPPED, {row.full_length} tokens, all {row.full_labelled} "
            f"labelled tokens lie beyond the {max_length}-token limit ==="
        )
        return "\n".join(lines)
    input_ids, labels = row.example["input_ids"], row.example["labels"]
    lines.append(f"=== row {number} ({row.location}): {len(input_ids)} tokens, {_labelled(labels)} labelled ===")
    if row.full_length > len(input_ids):
        lost = row.full_labelled - _labelled(labels)
        lines.append(f"cut from {row.full_length} to {max_length} tokens; {lost} labelled tokens lost")
    lines.append(render_tokens(tokenizer, input_ids, labels, color))
    lines.append("valid targets: " + _format_heads(row.head_targets))
    return "\n".join(lines)


def format_file_report(report: FileReport, max_length: int) -> str:
    """Return the summary block of the training set."""
    stats = report.stats
    share = report.labelled_tokens / max(report.total_tokens, 1)
    lines = [
        "=== training set (what caft train uses) ===",
        f"rows: {stats.summary()}",
        f"tokens: {report.total_tokens:,} total, {report.labelled_tokens:,} labelled ({share:.1%}); "
        f"longest row {report.longest_row} tokens",
        f"rows exactly {max_length} tokens long (cut by --model-max-length, or that long): {report.rows_at_limit}",
        "valid targets: " + _format_heads(report.head_targets),
    ]
    return "\n".join(lines)


def _format_heads(counts: list[int]) -> str:
    return ", ".join(f"head {k} {value:,}" for k, value in enumerate(counts))


def _labelled(labels: list[int]) -> int:
    return sum(_is_labelled(label) for label in labels)


def _is_labelled(label: int) -> bool:
    return label != IGNORE_INDEX


# Command line ------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add the `inspect-data` subcommand."""
    parser = subparsers.add_parser(
        "inspect-data",
        help="Show rows as training tokenizes them, with the trained tokens marked and token counts.",
        description="Render rows of a data file as `caft train` tokenizes them: trained tokens are marked, "
        "with token counts per row and for the training set, dropped rows and per-head target counts.",
    )
    parser.add_argument("file", nargs="?", help="Data file, .jsonl or .json (default: --config's train_set, else the embedded HumanEval split).")
    parser.add_argument("--config", help="A `caft train` YAML file; its model, length, field and head settings become the defaults.")
    parser.add_argument("--model-name-or-path", "--model", "-model", dest="model_name_or_path", default=argparse.SUPPRESS,
                        help="Model whose tokenizer and chat template to use (default: smollm2).")
    parser.add_argument("-n", "--num-rows", type=int, default=3, help="Rows to show, from the start of the file (default: 3).")
    parser.add_argument("--model-max-length", "-maxlen", dest="model_max_length", type=int, default=argparse.SUPPRESS,
                        help="Maximum tokens per row, as in training (default: 1024).")
    for name in ("prompt", "response", "system"):
        parser.add_argument(f"--{name}-field", dest=f"{name}_field", default=argparse.SUPPRESS,
                            help=f"JSON field holding the {name} text, as in `caft train`.")
    parser.add_argument("--size", "-sz", dest="size", type=int, default=argparse.SUPPRESS,
                        help="Count only the rows `caft train --size` would select (a seeded shuffle; default: all).")
    parser.add_argument("--seed", dest="seed", type=int, default=argparse.SUPPRESS, help="Seed of that shuffle (default: 42).")
    parser.add_argument("--caft-num-heads", "-heads", dest="caft_num_heads", type=int, default=argparse.SUPPRESS,
                        help="Auxiliary heads whose valid targets to count (default: 4).")
    parser.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                        help="Colour the trained tokens (default: on when stdout is a terminal and NO_COLOR is unset).")
    parser.set_defaults(handler=run_inspect_command)


def run_inspect_command(args: argparse.Namespace) -> int:
    from .assets import default_data_paths
    from .loading import load_tokenizer

    if args.num_rows < 0:
        raise ValueError(f"-n must be 0 or more, got {args.num_rows}.")
    config: TrainConfig = load_config(args)
    source = args.file or config.train_set or str(default_data_paths()[0])
    if not Path(source).exists():
        raise FileNotFoundError(f"Data file {source} not found.")
    color = args.color if args.color is not None else (sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    fields = dict(prompt_field=config.prompt_field, response_field=config.response_field, system_field=config.system_field)
    num_heads = config.caft_num_heads
    tokenizer = load_tokenizer(config.model_name_or_path)

    print(f"data: {source}")
    print(f"tokenizer: {config.model_name_or_path}; max length {config.model_max_length} tokens; {num_heads} auxiliary heads")
    marker = "in bold green" if color else f"between {MARK_START} and {MARK_END}"
    print(f"Trained tokens (labels) are shown {marker}. Head k's target at position t is token t+1+k.\n")
    shown = inspect_rows(source, tokenizer, config.model_max_length, num_heads, args.num_rows, **fields)
    for number, row in enumerate(shown, start=1):
        print(format_row(tokenizer, row, number, config.model_max_length, color) + "\n")
    report = inspect_file(source, tokenizer, config.model_max_length, num_heads, size=config.size, seed=config.seed, **fields)
    print(format_file_report(report, config.model_max_length))
    return 0
