"""Experiment trackers of `--report-to` (tensorboard, wandb, mlflow), run through the Trainer's integrations.

CAFTTrainer calls `check_report_to` before the Trainer builds its callbacks, so a missing package is
one clear error before any training, and `place_tensorboard_logs` after, so TensorBoard writes into
the run folder. Per-head metrics reach every tracker as scalars (`loss_head_k`, `acc_head_k`).
"""

from __future__ import annotations

import os

# --report-to value -> name of the transformers function that checks that its package is installed
TRACKERS = {"tensorboard": "is_tensorboard_available", "wandb": "is_wandb_available", "mlflow": "is_mlflow_available"}


def check_report_to(report_to) -> None:
    """Raise ValueError naming the pip command when the package of a --report-to tracker is missing."""
    import transformers.integrations.integration_utils as integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        check = TRACKERS.get(name)
        if check is not None and not getattr(integrations, check)():
            raise ValueError(
                f"--report-to {name} needs the {name} package, which is not installed: pip install 'caft[{name}]' "
                "(or pass --report-to none)."
            )


def place_tensorboard_logs(trainer) -> None:
    """Point TensorBoard at `<output_dir>/runs/<time>_<host>` now, not at train start.

    transformers 5.25's TensorBoardCallback picks its folder in on_train_begin, so the evaluation that
    caft runs before training would otherwise open a writer in `./runs` of the working directory.
    """
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = os.path.join(trainer.args.output_dir, default_logdir())
