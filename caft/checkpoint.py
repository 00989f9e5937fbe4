"""Checkpoints that survive crashes and signals: atomic publishing, the CAFT state file, the run stage, SIGINT/SIGTERM.

A checkpoint is written into `<run>/.staging-checkpoint-<step>/checkpoint-<step>` and renamed to
`<run>/checkpoint-<step>` only when every process has finished writing it. A crash mid-write
therefore leaves a staging folder, which the next save or resume removes, and never a
`checkpoint-<step>` folder that looks complete. Each checkpoint holds, besides the Trainer's files (model or adapter,
optimizer, scheduler, RNG states, trainer_state.json with the data position), `caft_heads.safetensors`
and `caft_state.json` (CAFT stage, mode, schedule and step).

`<run>/caft_stage.json` records which stage of `caft train` the run is in, so that a resumed run
skips a finished heads-pretraining stage and loads the heads it produced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

CHECKPOINT_STATE_NAME = "caft_state.json"
RUN_STAGE_NAME = "caft_stage.json"
STAGING_PREFIX = ".staging-"
FORMAT_VERSION = 1
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

# Values of "stage" in caft_state.json (heads only, or fine-tuning) and caft_stage.json (all three).
STAGE_HEADS = "heads"
STAGE_HEADS_PRETRAINING = "heads_pretraining"
STAGE_FINETUNING = "finetuning"


# Atomic files and folders --------------------------------------------------------------------------


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON to a temporary file, flush it to disk and rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` and the folders themselves, so a rename after it cannot outrun the data."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """Return the folder a checkpoint of `step` is written into before it is published."""
    return Path(run_dir) / f"{STAGING_PREFIX}checkpoint-{step}"


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Rename a fully written checkpoint folder to its final name; an older folder of that name is replaced."""
    _fsync_tree(staged)
    if final.exists():
        # A checkpoint of the same step from an earlier attempt: move it out of the way first, so
        # `final` is at every moment either the old complete checkpoint or the new one.
        retired = final.with_name(f"{STAGING_PREFIX}retired-{final.name}")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staged, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_dir(final.parent)


def remove_staging_dirs(run_dir: str | Path) -> list[Path]:
    """Delete the staging folders a crashed save left behind; return them."""
    run_dir = Path(run_dir)
    removed = []
    if not run_dir.is_dir():
        return removed
    for path in sorted(run_dir.glob(f"{STAGING_PREFIX}*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.warning("Removed %d unfinished checkpoint folder(s) in %s: %s", len(removed), run_dir, [p.name for p in removed])
    return removed


# The CAFT state of a checkpoint ---------------------------------------------------------------------


def checkpoint_state(caft_state, global_step: int, stage: str, num_heads: int) -> dict:
    """Build the contents of caft_state.json: the stage, the CAFT loss settings and progress at `global_step`."""
    return {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "stage": stage,
        "global_step": global_step,
        "num_heads": num_heads,
        **dataclasses.asdict(caft_state),
    }


def read_checkpoint_state(checkpoint: str | Path) -> dict | None:
    """Read a checkpoint's caft_state.json; None when it is missing or unreadable."""
    path = Path(checkpoint) / CHECKPOINT_STATE_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def incomplete_reason(checkpoint: str | Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete."""
    checkpoint = Path(checkpoint)
    state = read_checkpoint_state(checkpoint)
    if state is None:
        return f"no readable {CHECKPOINT_STATE_NAME}"
    if not state.get("complete"):
        return f"{CHECKPOINT_STATE_NAME} does not mark it complete"
    if not (checkpoint / "trainer_state.json").is_file():
        return "no trainer_state.json"
    return None


def newest_checkpoint(run_dir: str | Path) -> str | None:
    """Return the complete `checkpoint-<step>` folder of `run_dir` with the highest step, or None.

    Folders without a complete caft_state.json (an interrupted copy, a checkpoint of another tool)
    are skipped with a warning naming them.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    candidates = []
    for path in run_dir.iterdir():
        match = _CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            candidates.append((int(match.group(1)), path))
    for _step, path in sorted(candidates, reverse=True):
        reason = incomplete_reason(path)
        if reason is None:
            return str(path)
        logger.warning("Skipping checkpoint %s: %s.", path, reason)
    return None


# The stage of a `caft train` run ----------------------------------------------------------------------


def read_run_stage(run_dir: str | Path) -> dict | None:
    """Read `<run>/caft_stage.json`; None when the run has not recorded a stage."""
    path = Path(run_dir) / RUN_STAGE_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete it to restart the run from the beginning.") from None
    if not isinstance(data, dict) or "stage" not in data:
        raise ValueError(f"{path} has no 'stage' field; delete it to restart the run from the beginning.")
    return data


def write_run_stage(run_dir: str | Path, stage: str, **details) -> None:
    """Record the stage of a run (main process only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    write_json_atomic(Path(run_dir) / RUN_STAGE_NAME, {"format_version": FORMAT_VERSION, "stage": stage, **details})


# Signals -------------------------------------------------------------------------------------------


class TrainingInterrupted(SystemExit):
    """Raised by `Trainer.train()` after a SIGINT or SIGTERM stopped training and a checkpoint was saved.

    A SystemExit, so the command exits without a traceback, with code 128 + the signal number
    (130 for SIGINT, 143 for SIGTERM), as a shell reports a process ended by that signal.
    """

    def __init__(self, signum: int, checkpoint: str | None):
        super().__init__(128 + signum)
        self.signum = signum
        self.checkpoint = checkpoint


class StopOnSignal(TrainerCallback):
    """On SIGINT or SIGTERM, finish the current optimizer step, save a checkpoint and stop training.

    The handlers are installed for the duration of `Trainer.train()` (main thread only) and the
    previous ones are restored after the first signal, so a second Ctrl-C interrupts at once.
    With several processes, the processes agree on the signal at every step end (one all-reduce),
    so all of them save and stop at the same step even when only one received it.
    `Trainer.train()` then raises TrainingInterrupted from `on_train_end`.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.received: int | None = None
        self.stopped_by: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        self.received = signum
        self.restore_handlers()

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: SIGINT/SIGTERM will not save a checkpoint.")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore_handlers(self) -> None:
        """Put back the signal handlers that were installed before training (also after an exception)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _agreed_signal(self, args) -> int:
        """The signal number any process received (0 for none), the same on every process."""
        received = self.received or 0
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([received], device=args.device, dtype=torch.long)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = int(flag.item())
        return received

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.stopped_by = None
        self._install()

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agreed_signal(args)
        if signum and self.stopped_by is None:
            self.stopped_by = signum
            control.should_save = True
            control.should_training_stop = True
            logger.warning(
                "Received %s: saving a checkpoint at step %d and stopping.", signal.Signals(signum).name, state.global_step
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()
        if self.stopped_by is None:
            if self.received:
                logger.warning("Received %s after the last step; the run finishes normally.", signal.Signals(self.received).name)
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        logger.warning(
            "Training stopped by %s at step %d; checkpoint %s. Resume with the same command plus --continue-from-checkpoint.",
            signal.Signals(self.stopped_by).name,
            state.global_step,
            checkpoint,
        )
        raise TrainingInterrupted(self.stopped_by, checkpoint)
