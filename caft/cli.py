"""The `caft` command line.

    caft train --help
    caft train-heads -ts distilled.jsonl
    caft export RUN_DIR --out MERGED_DIR

Input errors (bad data, invalid flags, missing files) print one message and exit with code 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import traceback

from .config import add_config_arguments, load_config
from .export import add_export_arguments

logger = logging.getLogger("caft")

EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C


def setup_logging(verbose: bool = False) -> None:
    """Log caft and transformers messages to stderr; on non-main processes only warnings."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if (rank == 0 or verbose) else logging.WARNING
    logging.basicConfig(
        level=level, format=f"%(asctime)s [%(levelname)s] %(name)s{f' rank {rank}' if rank else ''}: %(message)s"
    )
    import transformers

    transformers.utils.logging.set_verbosity_warning()


def check_report_to(report_to: str) -> None:
    """Raise ValueError, with the install command, when the tracker named by --report-to is not installed."""
    import importlib.util

    packages = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow"}
    package = packages.get(report_to)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(
            f"--report-to {report_to} needs the {package} package, which is not installed: "
            f"`pip install {package}` (or `pip install 'caft[{report_to}]'`), or pass --report-to none."
        )


def _command_train(args: argparse.Namespace) -> int:
    from .train import format_head_metrics, run_train

    config = load_config(args)
    check_report_to(config.report_to)
    result = run_train(config)
    _print_summary("caft train", result, format_head_metrics)
    return 0


def _command_train_heads(args: argparse.Namespace) -> int:
    from .train import format_head_metrics
    from .train_heads import run_train_heads

    config = load_config(args)
    check_report_to(config.report_to)
    result = run_train_heads(config)
    _print_summary("caft train-heads", result, format_head_metrics)
    return 0


def _print_summary(name, result, format_head_metrics) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"\n{name} finished in {result.wall_time_s:.0f} s, peak memory {result.peak_memory_mb:.0f} MiB")
    if result.metrics_before:
        print("held-out before:", format_head_metrics(result.metrics_before))
    if result.metrics_after:
        print("held-out after: ", format_head_metrics(result.metrics_after))
    print(f"outputs: {result.output_dir}")


def _command_export(args: argparse.Namespace) -> int:
    from .export import command_export

    return command_export(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caft", description="Concept-aware fine-tuning of causal language models.")
    parser.add_argument("--verbose", action="store_true", help="Log INFO messages on every process.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="CAFT (or next-token) fine-tuning with LoRA or full weights.")
    add_config_arguments(train)
    train.set_defaults(handler=_command_train)

    train_heads = commands.add_parser("train-heads", help="Train only the auxiliary heads on a frozen base model.")
    add_config_arguments(train_heads)
    train_heads.set_defaults(handler=_command_train_heads)

    export = commands.add_parser("export", help="Merge a LoRA run into a plain model folder, heads left out.")
    add_export_arguments(export)
    export.set_defaults(handler=_command_export)

    for register in _extra_commands():
        register(commands)
    return parser


def _extra_commands():
    """Registration functions of the commands that live in their own modules."""
    registrations = []
    for module_name in ("caft.evaluate_cli", "caft.distill", "caft.eval_heads", "caft.generate_cli", "caft.inspect", "caft.plots"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        if hasattr(module, "register"):
            registrations.append(module.register)
    return registrations


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from .loading import load_environment

    load_environment()
    from .data import DataError

    try:
        return _run_command(args)
    # OSError includes a model or tokenizer that cannot be downloaded or read (no network, wrong path).
    except (DataError, OSError, ValueError) as error:
        if args.verbose:
            raise
        message = str(error) or type(error).__name__
        print(f"caft {args.command}: error: {message}", file=sys.stderr)
        print("(run `caft --verbose COMMAND ...` for the traceback)", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (while loading, for example): stop quietly, as a shell expects.
        if args.verbose:
            raise
        print(f"caft {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        close_process_group()


def _run_command(args: argparse.Namespace) -> int:
    """Run the command's handler. When it raises, clear the local variables of its finished frames.

    An exception on its way out (Ctrl-C, the checkpoint-and-exit of SIGTERM, an error under
    --verbose) keeps its traceback's frames, and with them the Trainer and its process group,
    alive until interpreter exit, where `close_process_group` could not free them.
    """
    try:
        return args.handler(args)
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)
        raise


def close_process_group() -> None:
    """Destroy the torch.distributed process group a command opened (torchrun, accelerate launch).

    Left open, the group's background threads can still run while the interpreter exits, which
    aborted gloo workers with "terminate called without an active exception" on a loaded machine.
    Garbage is collected first because the Trainer is in reference cycles (its callbacks point
    back at it). Otherwise its DistributedDataParallel wrapper, whose reducer references the group,
    outlives `destroy_process_group` and frees the group only during interpreter shutdown.
    """
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
