"""End-of-run reporting on real tiny-model runs: summary.md, plots, TensorBoard logs and tracker checks."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest

from caft.chat import build_dataset
from caft.cli import main
from caft.config import TrainConfig
from caft.summary import TokenCount, build_summary, count_trained_tokens, eval_seconds_in_training
from caft.tracking import check_report_to

TRAIN_ROWS = 8


def train_args(model_dir, gsm8k_files, out, *extra) -> list[str]:
    train, test = gsm8k_files
    return ["train", "-model", str(model_dir), "-ts", str(train), "-sz", str(TRAIN_ROWS), "-es", str(test), "-esz", "4",
            "--prompt-field", "question", "--response-field", "answer", "-maxlen", "128", "-micro-bs", "4",
            "--logging-steps", "1", "--output-dir", str(out), *map(str, extra)]


@pytest.fixture(scope="module")
def tensorboard_run(tiny_model_dir, gsm8k_files, tmp_path_factory):
    """One epoch (2 steps) of CAFT with heads pretraining, evaluated every step, reported to TensorBoard."""
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tb") / "run"
    handler = _ListHandler()
    loggers = [logging.getLogger("caft"), logging.getLogger("transformers")]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.addHandler(handler)
        item.setLevel(logging.INFO)
    try:
        code = main(train_args(tiny_model_dir, gsm8k_files, out, "-hpretrain", "--eval-steps", "1",
                               "--report-to", "tensorboard", "-heads", "2"))
    finally:
        for item, level in zip(loggers, levels):
            item.removeHandler(handler)
            item.setLevel(level)
    assert code == 0
    return out, handler.messages


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_summary_counts_tokens_of_whole_epoch(tensorboard_run, gsm8k_files, smol_tokenizer):
    out, _ = tensorboard_run
    text = (out / "summary.md").read_text()
    rows, _ = build_dataset(gsm8k_files[0], smol_tokenizer, 128, size=TRAIN_ROWS, seed=42,
                            prompt_field="question", response_field="answer")
    total = sum(len(row["input_ids"]) for row in rows)
    labelled = sum(sum(label != -100 for label in row["labels"]) for row in rows)
    # One epoch of each stage: stage 1 (heads pretraining) and stage 2 (fine-tuning) each see every row once.
    assert text.count(f"tokens trained: {total:,} ({labelled:,} labelled)") == 2
    assert "- optimizer steps: 2" in text
    data = json.loads((out / "metrics.json").read_text())["data"]
    for split, read, kept in (("train", 16, TRAIN_ROWS), ("eval", 8, 4)):
        reasons = "; ".join(f"{reason}: {count}" for reason, count in data[split]["skipped"].items())
        assert f"- {split}: read {read} rows, kept {kept}, skipped {read - kept} ({reasons})" in text
    assert "truncation to 128 tokens" in data["train"]["skipped"].__repr__()
    assert re.search(r"throughput: [\d,]+ tokens/s, [\d,]+ labelled tokens/s, excluding [\d.]+ s of evaluation", text)
    assert re.search(r"peak memory: [\d,]+ MiB", text)


def test_summary_head_table_matches_metrics(tensorboard_run):
    out, _ = tensorboard_run
    text = (out / "summary.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    for k in range(3):
        before, after = metrics["eval_before"][f"eval_loss_head_{k}"], metrics["eval"][f"eval_loss_head_{k}"]
        targets = metrics["eval"][f"eval_targets_head_{k}"]
        assert re.search(rf"^\| {k} \| {before:.4f} \| {after:.4f} \| [\d.]+ \| [\d.]+ \| {targets} \|$", text, re.M)
    assert "| caft_num_heads | 2 |" in text
    assert "| report_to | tensorboard |" in text


def test_plots_written_and_listed(tensorboard_run):
    out, messages = tensorboard_run
    names = ["loss.png", "head_loss.png", "head_accuracy.png"]
    for name in names + [f"heads_pretraining/{name}" for name in names]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    final = [message for message in messages if message.startswith("Wrote summary.md")]
    assert final == [f"Wrote summary.md, {', '.join(names + [f'heads_pretraining/{n}' for n in names])} to {out}"]


def test_tensorboard_gets_per_head_scalars(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, messages = tensorboard_run
    event_files = list((out / "runs").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1  # the evaluation before training writes into the same folder
    assert len(list((out / "heads_pretraining" / "runs").rglob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for k in range(3):
        assert {f"train/loss_head_{k}", f"train/acc_head_{k}", f"eval/loss_head_{k}", f"eval/acc_head_{k}"} <= tags
    assert [event.step for event in events.Scalars("train/loss_head_1")] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert events.Scalars("eval/loss_head_2")[-1].value == pytest.approx(metrics["eval"]["eval_loss_head_2"])
    # The list-valued eval_loss_by_head stays out of the trackers but in the metrics.
    assert not [message for message in messages if "dropped this attribute" in message]
    assert len(metrics["eval"]["eval_loss_by_head"]) == 3


def test_train_heads_summary_without_matplotlib(tiny_model_dir, gsm8k_files, tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "heads"
    args = train_args(tiny_model_dir, gsm8k_files, out, "--max-steps", "1", "-heads", "1")
    assert main(["train-heads", *args[1:]]) == 0
    text = (out / "summary.md").read_text()
    assert text.startswith("# caft train-heads run summary")
    assert re.search(r"- heads training: 0\.5 epochs in [\d.]+ s\n  - tokens trained: about [\d,]+", text)
    assert not list(out.glob("*.png"))
    assert "## Plots" not in text


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "tensorboard"])
def test_missing_tracker_names_extra(tracker, monkeypatch):
    for name in [name for name in sys.modules if name == tracker or name.startswith(tracker + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, tracker, None)
    if tracker == "tensorboard":
        monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ValueError, match=re.escape(f"pip install 'caft[{tracker}]'")):
        check_report_to([tracker])
    check_report_to([])
    check_report_to("none")


def test_missing_tracker_fails_before_training(tiny_model_dir, gsm8k_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, gsm8k_files, out, "--max-steps", "1", "--report-to", "mlflow")) == 2
    assert "--report-to mlflow needs the mlflow package" in capsys.readouterr().err
    assert not (out / "loss_log.csv").exists()


def test_partial_epoch_token_count_is_estimate():
    rows = [{"input_ids": [1] * 10, "labels": [-100] * 6 + [1] * 4}, {"input_ids": [1] * 20, "labels": [1] * 20}]
    whole = count_trained_tokens(rows, 2.0)
    assert (whole.total, whole.labelled, whole.exact) == (60, 48, True)
    half = count_trained_tokens(rows, 0.5)
    assert (half.total, half.labelled, half.exact) == (15, 12, False)


@pytest.mark.parametrize("resumed", [False, True])
def test_throughput_line(resumed):
    config = TrainConfig(continue_from_checkpoint=resumed)
    stages = {"fine-tuning": {"train_runtime": 12.0, "epoch": 1.0}}
    tokens = {"fine-tuning": TokenCount(total=100, labelled=40, exact=True)}
    text = build_summary("caft train", config, {}, stages, tokens, eval_seconds=2.0, global_step=5, plots=[])
    assert "- fine-tuning: 1 epoch in 12.0 s" in text
    assert "  - tokens trained: 100 (40 labelled)" in text
    if resumed:
        assert "tokens/s" not in text
        assert "throughput: not computed" in text
    else:
        assert "throughput: 10 tokens/s, 4 labelled tokens/s, excluding 2.0 s of evaluation during training" in text


def test_eval_seconds_only_inside_training():
    rows = [
        {"split": "eval", "step": 0, "loss": 2.0, "runtime": 100.0},  # before training
        {"split": "train", "step": 1, "loss": 1.0},
        {"split": "eval", "step": 1, "loss": 1.9, "runtime": 3.0},
        {"split": "train", "step": 2, "loss": 0.9},
        {"split": "eval", "step": 2, "loss": 1.8, "runtime": 4.0},
        {"split": "train", "step": 2, "train_runtime": 30.0},
        {"split": "eval", "step": 2, "loss": 1.8, "runtime": 50.0},  # after training
    ]
    assert eval_seconds_in_training(rows) == 7.0
    assert eval_seconds_in_training(rows[:2]) == 0.0


def test_wandb_offline_gets_per_head_metrics(tiny_model_dir, gsm8k_files, tmp_path, monkeypatch):
    """Runs only where wandb is installed; offline mode writes the run locally and contacts no server."""
    wandb = pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                        "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_GIT": "true", "WANDB_PROJECT": "caft-test"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, gsm8k_files, out, "--max-steps", "2", "--eval-steps", "1",
                           "--report-to", "wandb", "-heads", "1")) == 0
    # The Trainer leaves the wandb run open until the process exits; its summary contains the last value of each key.
    summary = dict(wandb.run.summary)
    wandb.finish()
    assert len(list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    for k in range(2):
        assert summary[f"eval/loss_head_{k}"] == pytest.approx(metrics["eval"][f"eval_loss_head_{k}"])
        assert f"train/acc_head_{k}" in summary
    assert "eval/loss_by_head" not in summary


def test_mlflow_local_store_gets_per_head_metrics(tiny_model_dir, gsm8k_files, tmp_path, monkeypatch):
    """Runs only where mlflow is installed; the tracking URI is a local folder, so no server is contacted."""
    mlflow = pytest.importorskip("mlflow")
    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "caft-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 needs this for a folder store
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, gsm8k_files, out, "--max-steps", "2", "--eval-steps", "1",
                           "--report-to", "mlflow", "-heads", "1")) == 0
    if mlflow.active_run() is not None:
        mlflow.end_run()

    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("caft-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    metrics = json.loads((out / "metrics.json").read_text())
    for k in range(2):
        assert [m.step for m in client.get_metric_history(run_id, f"loss_head_{k}")] == [1, 2]
        evals = client.get_metric_history(run_id, f"eval_loss_head_{k}")
        assert [m.step for m in evals] == [0, 1, 2]
        assert evals[-1].value == pytest.approx(metrics["eval"][f"eval_loss_head_{k}"])
    assert "eval_loss_by_head" not in runs[0].data.metrics
