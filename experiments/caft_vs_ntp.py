"""CAFT LoRA against next-token LoRA on the same data, steps and seeds, scored with `caft eval`.

    nice python experiments/caft_vs_ntp.py --tasks gsm8k mbpp --seeds 0 1 2 --work-dir /tmp/caft-vs-ntp
    python experiments/caft_vs_ntp.py --tasks gsm8k mbpp --work-dir /tmp/caft-vs-ntp --report-only

For each seed and task it runs, through the `caft` command line:
1. `caft train --mode default -ftm lora` (next-token baseline) and `caft train --mode caft -ftm lora
   -ft-heads -hdir HEADS` with identical data, flags and seed;
2. `caft eval` of each adapter: held-out answer loss and the task metric (GSM8K exact match;
   MBPP and HumanEval pass@1).
The heads are trained once per task on the same training rows with `caft train-heads` (the
original workflow: heads are trained once per base model, then reused), unless --heads-dir is given.

Training and held-out files are written to WORK_DIR/<task>/data in the chat format that
`caft eval` prompts with, so that training and evaluation prompts match. Finished runs and
evaluations are skipped when the script is rerun, so an interrupted experiment continues.
The report (mean and sample standard deviation over seeds, per-seed values, a PNG plot) goes
into the `## CAFT vs next-token` section of docs/results.md and docs/img/.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from caft.assets import shared_data_dir  # noqa: E402

SHARED_DATA = shared_data_dir()
SECTION_TITLE = "## CAFT vs next-token"
MODE_LABELS = {"default": "next-token LoRA", "caft": "CAFT LoRA"}
SECOND_MODE = "caft-second"
# Metrics per task: (eval task, metric key, label, higher is better).
TASK_METRICS = {
    "gsm8k": [("gsm8k", "exact_match", "GSM8K exact match", True), ("loss", "loss", "held-out answer loss", False)],
    "mbpp": [
        ("mbpp", "pass@1", "MBPP pass@1", True),
        ("humaneval", "pass@1", "HumanEval pass@1", True),
        ("loss", "loss", "held-out answer loss", False),
    ],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["gsm8k", "mbpp"], choices=sorted(TASK_METRICS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work-dir", type=Path, required=True, help="Folder for data, runs and evaluations.")
    parser.add_argument("--model", default="smollm2", help="Base model (default: %(default)s).")
    parser.add_argument("--train-rows", type=int, default=128, help="Training rows per task (default: %(default)s).")
    parser.add_argument("--eval-rows", type=int, default=50, help="Held-out rows per metric (default: %(default)s).")
    parser.add_argument("--max-length", type=int, default=256, help="Maximum tokens per training row (default: %(default)s).")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Generation limit (default: %(default)s).")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="LoRA learning rate (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=4, help="Rows per optimizer step (default: %(default)s).")
    parser.add_argument("--heads-epochs", type=float, default=2.0, help="Epochs of `caft train-heads` (default: %(default)s).")
    parser.add_argument("--heads-learning-rate", type=float, default=1e-3, help="Learning rate of `caft train-heads` (default: %(default)s).")
    parser.add_argument("--heads-dir", default=None, help="Use these trained heads for every task instead of training them.")
    parser.add_argument(
        "--second-heads", default=None,
        help="Also run CAFT LoRA with these heads (for example heads trained on self-distilled data), as another column.",
    )
    parser.add_argument(
        "--second-heads-label", default="CAFT LoRA, second heads", help="Column label of --second-heads (default: %(default)s)."
    )
    parser.add_argument(
        "--metrics", nargs="+", default=None, choices=("gsm8k", "mbpp", "humaneval", "loss"),
        help="Evaluations to run (default: all of each task's; `--metrics loss` skips generation, the costly part).",
    )
    parser.add_argument("--report-only", action="store_true", help="Only rebuild the report from finished evaluations.")
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "docs", help="Folder of results.md and img/.")
    return parser.parse_args(argv)


# Data ---------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _chat(prompt: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}


def _mbpp_reply(row: dict) -> str:
    return "```python\n" + row["code"].replace("\r\n", "\n").strip() + "\n```"


def prepare_data(task: str, data_dir: Path, train_rows: int, eval_rows: int) -> dict[str, Path]:
    """Write the training rows and held-out files of a task; return their paths by role.

    The training subset is the first `train_rows` after a shuffle with a fixed seed (0), so every
    seed and both modes train on the same rows. The held-out rows are the first `eval_rows` of
    the test split, the same ones that `caft eval --limit` scores.
    """
    from caft.evaluate import GSM8K_PROMPT, MBPP_PROMPT

    if task == "gsm8k":
        train = _read_jsonl(SHARED_DATA / "gsm8k" / "train.jsonl")
        test = _read_jsonl(SHARED_DATA / "gsm8k" / "test.jsonl")[:eval_rows]
        random.Random(0).shuffle(train)
        chats = [_chat(GSM8K_PROMPT.format(question=row["question"]), row["answer"]) for row in train[:train_rows]]
        held_out = [_chat(GSM8K_PROMPT.format(question=row["question"]), row["answer"]) for row in test]
        return {
            "train": _write_jsonl(data_dir / "train.jsonl", chats),
            "loss": _write_jsonl(data_dir / "loss_eval.jsonl", held_out),
            "gsm8k": _write_jsonl(data_dir / "test.jsonl", test),
        }
    rows = _read_jsonl(SHARED_DATA / "mbpp" / "mbpp.jsonl")
    train = [row for row in rows if 511 <= row["task_id"] <= 974]
    test = sorted((row for row in rows if 11 <= row["task_id"] <= 510), key=lambda row: row["task_id"])[:eval_rows]
    random.Random(0).shuffle(train)

    def chat(row):
        return _chat(MBPP_PROMPT.format(text=row["text"], test=row["test_list"][0]), _mbpp_reply(row))

    return {
        "train": _write_jsonl(data_dir / "train.jsonl", [chat(row) for row in train[:train_rows]]),
        "loss": _write_jsonl(data_dir / "loss_eval.jsonl", [chat(row) for row in test]),
        "mbpp": _write_jsonl(data_dir / "test.jsonl", test),
    }


# Runs ---------------------------------------------------------------------------------------------


def run_caft(arguments: list[str], log_path: Path) -> None:
    """Run `caft ARGUMENTS` with the project's interpreter, output to LOG_PATH; raise on failure."""
    command = [sys.executable, "-m", "caft.cli", *arguments]
    print("+ caft " + " ".join(arguments), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"`caft {arguments[0]}` failed with exit code {completed.returncode}; see {log_path}")


def train_heads(args, task: str, files: dict[str, Path], task_dir: Path) -> Path:
    heads_dir = task_dir / "heads-run"
    if not (heads_dir / "heads" / "config.json").is_file():
        run_caft(
            [
                "train-heads", "-model", args.model, "-ts", str(files["train"]), "-maxlen", str(args.max_length),
                "-e", str(args.heads_epochs), "-lr", str(args.heads_learning_rate),
                "-micro-bs", str(args.batch_size), "--output-dir", str(heads_dir), "--overwrite-output-dir",
            ],
            task_dir / "logs" / "train-heads.log",
        )
    return heads_dir / "heads"


def train_run(args, mode: str, seed: int, files: dict[str, Path], heads: Path | None, run_dir: Path, log: Path) -> None:
    if (run_dir / "adapter_config.json").is_file() and (run_dir / "metrics.json").is_file():
        return
    arguments = [
        "train", "-model", args.model, "-ts", str(files["train"]), "-ftm", "lora", "--mode", "default" if mode == "default" else "caft",
        "-maxlen", str(args.max_length), "-e", str(args.epochs), "-lr", str(args.learning_rate),
        "-micro-bs", str(args.batch_size), "--seed", str(seed), "--logging-steps", "4",
        "--output-dir", str(run_dir), "--overwrite-output-dir",
    ]
    if mode != "default":
        arguments += ["-ft-heads", "-hdir", str(heads)]
    run_caft(arguments, log)


def eval_run(args, model: Path | str, eval_task: str, files: dict[str, Path], log: Path, result_dir: Path | None = None) -> dict:
    """Run `caft eval` on a run folder or model unless its results exist; results go to RESULT_DIR/eval/<task>."""
    out = Path(result_dir or model) / "eval" / eval_task
    results = out / "eval_results.json"
    if not results.is_file():
        arguments = ["eval", str(model), "--task", eval_task, "--limit", str(args.eval_rows), "--out", str(out)]
        if eval_task == "loss":
            arguments += ["--data", str(files["loss"]), "--max-length", "1024"]
        else:
            arguments += ["--max-new-tokens", str(args.max_new_tokens)]
            if eval_task != "humaneval":
                arguments += ["--data", str(files[eval_task])]
        run_caft(arguments, log)
    return json.loads(results.read_text())


def selected_evaluations(args, task: str) -> list[str]:
    evaluations = [eval_task for eval_task, *_ in TASK_METRICS[task]]
    return [name for name in evaluations if args.metrics is None or name in args.metrics]


def experiment_modes(args) -> list[str]:
    """Return the run modes: next-token, CAFT, and CAFT with --second-heads when given."""
    return ["default", "caft", SECOND_MODE] if args.second_heads else ["default", "caft"]


def mode_label(args, mode: str) -> str:
    return args.second_heads_label if mode == SECOND_MODE else MODE_LABELS[mode]


def run_experiment(args) -> None:
    tasks = {}
    for task in args.tasks:
        task_dir = args.work_dir / task
        files = prepare_data(task, task_dir / "data", args.train_rows, args.eval_rows)
        heads = Path(args.heads_dir) if args.heads_dir else None
        tasks[task] = (task_dir, files, heads)
    # Seeds outside, tasks inside: an experiment cut short still has every task at the same seed count.
    for seed in args.seeds:
        for task, (task_dir, files, heads) in tasks.items():
            if heads is None:
                heads = train_heads(args, task, files, task_dir)
                tasks[task] = (task_dir, files, heads)
            for mode in experiment_modes(args):
                run_dir = task_dir / f"{mode}-seed{seed}"
                mode_heads = Path(args.second_heads) if mode == SECOND_MODE else heads
                train_run(args, mode, seed, files, mode_heads, run_dir, task_dir / "logs" / f"train-{mode}-seed{seed}.log")
                for eval_task in selected_evaluations(args, task):
                    eval_run(args, run_dir, eval_task, files, task_dir / "logs" / f"eval-{eval_task}-{mode}-seed{seed}.log")
            write_report(args)
    # The base model without fine-tuning, once per task: greedy decoding does not depend on the seed.
    for task, (task_dir, files, _heads) in tasks.items():
        for eval_task in selected_evaluations(args, task):
            eval_run(args, args.model, eval_task, files, task_dir / "logs" / f"eval-{eval_task}-base.log", task_dir / "base")
        write_report(args)


# Report -------------------------------------------------------------------------------------------


def collect(work_dir: Path, task: str, modes: list[str]) -> dict:
    """Read every finished evaluation: {(eval task, metric): {mode: {seed: value}}} plus the run settings."""
    values: dict = {}
    base_values: dict = {}
    settings: dict = {}
    for eval_task, metric, _label, _higher in TASK_METRICS[task]:
        by_mode = values.setdefault((eval_task, metric), {})
        for mode in modes:
            for results in sorted((work_dir / task).glob(f"{mode}-seed*/eval/{eval_task}/eval_results.json")):
                seed = int(results.parents[2].name.rsplit("seed", 1)[1])
                loaded = json.loads(results.read_text())
                by_mode.setdefault(mode, {})[seed] = loaded[metric]
                settings[eval_task] = {"examples": loaded.get("num_examples"), **loaded.get("settings", {})}
        base_results = work_dir / task / "base" / "eval" / eval_task / "eval_results.json"
        if base_results.is_file():
            base_values[(eval_task, metric)] = json.loads(base_results.read_text())[metric]
    return {"values": values, "base": base_values, "settings": settings}


def _mean_spread(values: list[float], signed: bool = False) -> str:
    """Format the mean and, with two or more values, the sample standard deviation."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    # Differences get one more decimal: on held-out loss they are often below 1e-4.
    decimals = 5 if signed else 4
    text = f"{mean:+.{decimals}f}" if signed else f"{mean:.{decimals}f}"
    if len(values) == 1:
        return text
    return f"{text} ± {statistics.stdev(values):.{decimals}f}"


def _value_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _paired_differences(by_mode: dict, mode: str = "caft") -> list[float]:
    """MODE minus next-token, per seed that has both."""
    seeds = sorted(set(by_mode.get("default", {})) & set(by_mode.get(mode, {})))
    return [by_mode[mode][seed] - by_mode["default"][seed] for seed in seeds]


def task_block(args, task: str, collected: dict, plot_name: str | None) -> str:
    """Markdown of one task: the settings, a table of mean ± sample std over seeds and the per-seed values."""
    modes = experiment_modes(args)
    caft_modes = modes[1:]
    lines = [f"### {task.upper()}", ""]
    config = _run_config(args.work_dir / task)
    generated = [name for name, *_ in TASK_METRICS[task] if name != "loss" and name in collected["settings"]]
    generation_note = " No generation metric was run."
    if generated:
        max_new_tokens = collected["settings"][generated[0]].get("max_new_tokens")
        generation_note = f" Greedy decoding, at most {max_new_tokens} new tokens."
    if config:
        heads_note = f"heads from `{args.heads_dir}`" if args.heads_dir else "heads from `caft train-heads` on the same training rows"
        if args.second_heads:
            heads_note += f"; {args.second_heads_label}: heads from `{args.second_heads}`"
        lines.append(
            f"Model `{config['model_name_or_path']}`, {config['train_rows']} training rows, {config['epochs']:g} epoch, "
            f"LoRA r {config['lora_r']}, learning rate {config['learning_rate']:g}, micro-batch {config['per_device_batch_size']}, "
            f"max length {config['model_max_length']}; CAFT: {config['caft_num_heads']} heads, beta {config['caft_heads_coefficient']:g}, "
            f"gamma {config['caft_decay_coefficient']:g}, schedule {config['caft_scheduler']}, -ft-heads, {heads_note}.{generation_note}"
        )
        lines.append("")

    differences = [f"{mode_label(args, mode)} − next-token" for mode in caft_modes]
    columns = ["metric", "examples", "base model", *(mode_label(args, mode) for mode in modes), *differences, "seeds"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for eval_task, metric, label, higher in TASK_METRICS[task]:
        by_mode = collected["values"].get((eval_task, metric), {})
        if not any(by_mode.values()):
            continue
        seeds = sorted(set().union(*(by_mode.get(mode, {}).keys() for mode in modes)))
        examples = collected["settings"].get(eval_task, {}).get("examples", "-")
        base = collected["base"].get((eval_task, metric))
        cells = [_mean_spread(list(by_mode.get(mode, {}).values())) for mode in modes]
        cells += [_mean_spread(_paired_differences(by_mode, mode), signed=True) for mode in caft_modes]
        arrow = "higher is better" if higher else "lower is better"
        base_cell = "-" if base is None else f"{base:.4f}"
        row = [f"{label} ({arrow})", str(examples), base_cell, *cells, ", ".join(map(str, seeds))]
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", f"Per seed ({' / '.join(mode_label(args, mode) for mode in modes)}):", ""]
    for eval_task, metric, label, _higher in TASK_METRICS[task]:
        by_mode = collected["values"].get((eval_task, metric), {})
        if not any(by_mode.values()):
            continue
        seeds = sorted(set().union(*(by_mode.get(mode, {}).keys() for mode in modes)))
        groups = [f"seed {seed}: " + " / ".join(_value_or_dash(by_mode.get(mode, {}).get(seed)) for mode in modes) for seed in seeds]
        lines.append(f"- {label}: " + "; ".join(groups))
    if plot_name:
        lines += ["", f"![{task} CAFT vs next-token](img/{plot_name})"]
    return "\n".join(lines)


def _run_config(task_dir: Path) -> dict | None:
    import yaml

    for config_path in sorted(task_dir.glob("caft-seed*/config.yaml")):
        config = yaml.safe_load(config_path.read_text())
        train_file = Path(config["train_set"])
        config["train_rows"] = sum(1 for line in train_file.read_text().splitlines() if line.strip()) if train_file.is_file() else "?"
        return config
    return None


def plot_task(args, task: str, collected: dict, out_path: Path) -> bool:
    """Draw one panel per metric: a bar per mode at the seed mean, a dot per seed. Return False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed; skipping the plot", file=sys.stderr)
        return False
    metrics = [item for item in TASK_METRICS[task] if any(collected["values"].get(tuple(item[:2]), {}).values())]
    figure = Figure(figsize=(3.6 * len(metrics), 3.4))
    FigureCanvasAgg(figure)
    modes = experiment_modes(args)
    labels = ["base model", *(mode_label(args, mode) for mode in modes)]
    for index, (eval_task, metric, label, higher) in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        by_mode = collected["values"].get((eval_task, metric), {})
        base = collected["base"].get((eval_task, metric))
        if base is not None:
            axes.bar(0, base, color="lightgray", hatch="//", edgecolor="gray")
        for position, mode in enumerate(modes, start=1):
            seed_values = list(by_mode.get(mode, {}).values())
            if seed_values:
                axes.bar(position, statistics.fmean(seed_values), color=("tab:gray", "tab:blue", "tab:green")[position - 1], alpha=0.6)
                axes.scatter([position] * len(seed_values), seed_values, color="black", s=12, zorder=3)
        axes.set_xticks(range(len(labels)), [textwrap.fill(text, 12) for text in labels], fontsize=7)
        if not higher:
            # Start the loss axis near the values, so that small differences stay visible.
            shown = [value for value in [base, *(v for mode in modes for v in by_mode.get(mode, {}).values())] if value is not None]
            axes.set_ylim(min(shown) * 0.98, max(shown) * 1.01)
        axes.set_title(f"{label}\n({'higher' if higher else 'lower'} is better)", fontsize=9)
    figure.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=110)
    return True


def write_report(args) -> None:
    """Rebuild each task's block inside the `## CAFT vs next-token` section of results.md, leaving other text alone."""
    results_path = args.docs / "results.md"
    text = results_path.read_text(encoding="utf-8") if results_path.is_file() else "# Results\n"
    for task in args.tasks:
        collected = collect(args.work_dir, task, experiment_modes(args))
        if not any(collected["values"].values()):
            continue
        plot_name = f"caft_vs_ntp_{task}.png"
        if not plot_task(args, task, collected, args.docs / "img" / plot_name):
            plot_name = None
        block = task_block(args, task, collected, plot_name)
        text = replace_block(text, task, block)
        print(block, flush=True)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(text, encoding="utf-8")


def replace_block(text: str, task: str, block: str) -> str:
    """Put BLOCK between the task's markers in the section, adding the section or the markers where missing."""
    start, end = f"<!-- caft_vs_ntp {task} start -->", f"<!-- caft_vs_ntp {task} end -->"
    marked = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + marked + rest.split(end, 1)[1]
    if SECTION_TITLE not in text:
        return text.rstrip("\n") + f"\n\n{SECTION_TITLE}\n\n{marked}\n"
    head, rest = text.split(SECTION_TITLE, 1)
    # Insert at the end of the section: before the next "## " heading, or at the end of the file.
    next_heading = rest.find("\n## ")
    if next_heading == -1:
        return head + SECTION_TITLE + rest.rstrip("\n") + f"\n\n{marked}\n"
    return head + SECTION_TITLE + rest[:next_heading].rstrip("\n") + f"\n\n{marked}\n" + rest[next_heading:]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        write_report(args)
        return 0
    run_experiment(args)
    write_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
