"""Exact resume: runs stopped by a signal, a crash or a crash mid-save, then resumed, follow the uninterrupted run.

Every run is the real `run_train` pipeline on a tiny Llama with SmolLM2's tokenizer, float32 on the CPU,
with shuffled data, gradient accumulation 2 and LoRA dropout (so the RNG states must be restored too).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import caft.train
from caft.checkpoint import (
    CHECKPOINT_STATE_NAME,
    RUN_STAGE_NAME,
    TrainingInterrupted,
    newest_checkpoint,
    read_checkpoint_state,
)
from caft.config import TrainConfig
from caft.train import run_train

LOSS_TOLERANCE = 1e-5
LOSS_COLUMNS = ("loss", "loss_head_0", "loss_head_1", "loss_head_2")
# A random tiny model's loss barely moves (about ln(vocabulary size)), so the gradient norm and the
# final weights are compared too: they change visibly when any part of the state is not restored.
GRAD_NORM_RELATIVE_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-6


def make_config(model_dir, train_file, output_dir, **overrides) -> TrainConfig:
    """12 rows, micro-batch 2 x accumulation 2: 3 optimizer steps per epoch, 2 epochs, LoRA with dropout."""
    values = dict(
        model_name_or_path=str(model_dir),
        train_set=str(train_file),
        prompt_field="question",
        response_field="answer",
        size=12,
        model_max_length=128,
        per_device_batch_size=2,
        gradient_accumulation_steps=2,
        epochs=2,
        learning_rate=5e-3,
        heads_pretrain_learning_rate=5e-3,
        caft_num_heads=2,
        caft_heads_coefficient=0.5,
        caft_scheduler="linear",
        lora_r=4,
        lora_dropout=0.1,
        logging_steps=1,
        save_steps=3,
        seed=7,
        output_dir=str(output_dir),
    )
    values.update(overrides)
    return TrainConfig(**values)


def train_losses(log_file: Path) -> dict[int, dict[str, float]]:
    """The training rows of a loss_log.csv by step; a step logged twice keeps its last row."""
    losses = {}
    with open(log_file, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "train" and row.get("loss"):
                losses[int(row["step"])] = {name: float(row[name]) for name in (*LOSS_COLUMNS, "grad_norm")}
    return losses


def assert_same_losses(expected: dict, actual: dict) -> None:
    assert sorted(actual) == sorted(expected), "the resumed run logged other steps"
    for step, values in expected.items():
        for name in LOSS_COLUMNS:
            assert abs(actual[step][name] - values[name]) <= LOSS_TOLERANCE, f"step {step} {name}: {actual[step][name]} vs {values[name]}"
        assert actual[step]["grad_norm"] == pytest.approx(values["grad_norm"], rel=GRAD_NORM_RELATIVE_TOLERANCE), f"step {step}"


def assert_same_weights(expected_file: Path, actual_file: Path) -> None:
    """Compare two safetensors files tensor by tensor."""
    from safetensors.torch import load_file

    expected, actual = load_file(str(expected_file)), load_file(str(actual_file))
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, atol=WEIGHT_TOLERANCE), f"{actual_file}: {name}"


class SignalAtStep(TrainerCallback):
    """Send a signal to this process during optimizer step `step` of the stage writing to `stage_dir`."""

    def __init__(self, step: int, stage_dir: Path, signum: int = signal.SIGTERM):
        self.step, self.stage_dir, self.signum = step, str(stage_dir), signum

    def on_optimizer_step(self, args, state, control, **kwargs):
        # global_step still counts the finished steps here: this is step global_step + 1.
        if args.output_dir == self.stage_dir and state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


class CrashAtStep(TrainerCallback):
    """Raise at the end of step `step` of the stage writing to `stage_dir`, before it is logged or saved.

    A crash that leaves no chance to write a checkpoint.
    """

    def __init__(self, step: int, stage_dir: Path):
        self.step, self.stage_dir = step, str(stage_dir)

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir == self.stage_dir and state.global_step == self.step:
            raise RuntimeError("simulated crash")


def add_callback(monkeypatch, callback) -> None:
    """Give every Trainer that run_train builds one more callback."""
    original = caft.train.make_trainer

    def make_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(caft.train, "make_trainer", make_trainer)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir, gsm8k_files):
    """The uninterrupted LoRA run: its folder and logged losses."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir))
    return run_dir, train_losses(run_dir / "loss_log.csv")


@pytest.fixture(scope="module")
def reference_pretraining_run(tmp_path_factory, tiny_model_dir, gsm8k_files):
    """The uninterrupted run with heads pretraining (3 steps) before 3 fine-tuning steps."""
    run_dir = tmp_path_factory.mktemp("reference-hpretrain") / "run"
    run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, heads_pretraining=True, epochs=1, save_steps=2))
    return run_dir


def test_sigterm_mid_epoch_then_resume_matches(tmp_path, monkeypatch, reference_run, tiny_model_dir, gsm8k_files):
    reference_dir, expected = reference_run
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    run_dir = tmp_path / "run"
    config = make_config(tiny_model_dir, gsm8k_files[0], run_dir)

    with monkeypatch.context() as patch:
        add_callback(patch, SignalAtStep(2, run_dir))
        with pytest.raises(TrainingInterrupted) as stopped:
            run_train(config)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert stopped.value.checkpoint == str(run_dir / "checkpoint-2")
    assert newest_checkpoint(run_dir) == str(run_dir / "checkpoint-2")  # step 2 is no --save-steps multiple
    saved = read_checkpoint_state(run_dir / "checkpoint-2")
    assert saved["stage"] == "finetuning" and saved["global_step"] == 2 and saved["schedule"] == "linear"
    assert (run_dir / "checkpoint-2" / "caft_heads.safetensors").is_file()
    assert sorted(train_losses(run_dir / "loss_log.csv")) == [1, 2]

    run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, continue_from_checkpoint=True))
    assert_same_losses(expected, train_losses(run_dir / "loss_log.csv"))
    assert_same_weights(reference_dir / "adapter_model.safetensors", run_dir / "adapter_model.safetensors")


def test_resume_with_head_lora_matches(tmp_path, monkeypatch, tiny_model_dir, gsm8k_files):
    """LoRA on the heads at twice the rank: the saved adapter config names no head pattern, and resuming is still exact."""
    heads_lora = dict(finetune_heads=True, heads_r_multiplier=2, epochs=1)
    reference_dir = tmp_path / "reference"
    run_train(make_config(tiny_model_dir, gsm8k_files[0], reference_dir, **heads_lora))
    run_dir = tmp_path / "run"

    with monkeypatch.context() as patch:
        add_callback(patch, SignalAtStep(2, run_dir))
        with pytest.raises(TrainingInterrupted):
            run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, **heads_lora))
    assert "caft_heads" not in (run_dir / "checkpoint-2" / "adapter_config.json").read_text()
    run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, continue_from_checkpoint=True, **heads_lora))

    assert_same_losses(train_losses(reference_dir / "loss_log.csv"), train_losses(run_dir / "loss_log.csv"))
    assert_same_weights(reference_dir / "adapter_model.safetensors", run_dir / "adapter_model.safetensors")
    assert_same_weights(reference_dir / "heads" / "model.safetensors", run_dir / "heads" / "model.safetensors")


def test_resume_rejects_other_finetune_method(tmp_path, monkeypatch, tiny_model_dir, gsm8k_files):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        add_callback(patch, SignalAtStep(1, run_dir))
        with pytest.raises(TrainingInterrupted):
            run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir))
    config_before = (run_dir / "config.yaml").read_text()

    with pytest.raises(ValueError, match="finetune_method 'lora' -> 'sft'"):
        run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, finetune_method="sft", continue_from_checkpoint=True))
    assert (run_dir / "config.yaml").read_text() == config_before  # the refused resume leaves the record alone


def test_resume_changed_steps_drops_rows(tmp_path, monkeypatch, tiny_model_dir, gsm8k_files, caplog):
    """A crash after step 3 with checkpoint-2, resumed with another --max-steps: a warning, both settings
    files, and a loss log without the interrupted run's step 3."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        add_callback(patch, CrashAtStep(4, run_dir))
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, save_steps=2))
    assert newest_checkpoint(run_dir) == str(run_dir / "checkpoint-2")
    assert logged_train_steps(run_dir) == [1, 2, 3]

    with caplog.at_level("WARNING", logger="caft.train"):
        run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, save_steps=2, max_steps=4, continue_from_checkpoint=True))

    assert any("max_steps -1 -> 4" in record.getMessage() for record in caplog.records)
    assert "max_steps: -1" in (run_dir / "config-before-resume.yaml").read_text()
    assert "max_steps: 4" in (run_dir / "config.yaml").read_text()
    assert logged_train_steps(run_dir) == [1, 2, 3, 4]


def logged_train_steps(run_dir: Path) -> list[int]:
    """Every training row's step in loss_log.csv, repeats included."""
    with open(run_dir / "loss_log.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row["split"] == "train" and row.get("loss")]


def test_overwrite_output_dir_starts_over(tmp_path, tiny_model_dir, gsm8k_files, caplog):
    run_dir = tmp_path / "run"
    run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, max_steps=2, save_steps=1))
    assert (run_dir / "checkpoint-2").is_dir()

    with caplog.at_level("WARNING", logger="caft.train"):
        run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, max_steps=1, save_steps=1, overwrite_output_dir=True))

    assert sorted(item.name for item in run_dir.glob("checkpoint-*")) == ["checkpoint-1"]
    assert logged_train_steps(run_dir) == [1]
    assert any("deleted checkpoint-1, checkpoint-2, loss_log.csv" in record.getMessage() for record in caplog.records)


def test_crash_while_saving_leaves_no_checkpoint(tmp_path, monkeypatch, reference_run, tiny_model_dir, gsm8k_files):
    reference_dir, expected = reference_run
    run_dir = tmp_path / "run"
    from caft.trainer import CAFTTrainer

    original = CAFTTrainer._save_rng_state

    def crash_at_second_save(self, output_dir):
        if self.state.global_step == 6:
            raise OSError("simulated disk failure")
        return original(self, output_dir)

    with monkeypatch.context() as patch:
        patch.setattr(CAFTTrainer, "_save_rng_state", crash_at_second_save)
        with pytest.raises(OSError, match="simulated disk failure"):
            run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir))
    # The half-written step-6 checkpoint stays in its staging folder; checkpoint-6 never appears.
    assert (run_dir / ".staging-checkpoint-6" / "checkpoint-6" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "checkpoint-6").exists()
    assert newest_checkpoint(run_dir) == str(run_dir / "checkpoint-3")

    run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, continue_from_checkpoint=True))
    assert not list(run_dir.glob(".staging-*"))
    assert newest_checkpoint(run_dir) == str(run_dir / "checkpoint-6")
    assert_same_losses(expected, train_losses(run_dir / "loss_log.csv"))
    assert_same_weights(reference_dir / "adapter_model.safetensors", run_dir / "adapter_model.safetensors")


def test_newest_checkpoint_skips_incomplete_folders(tmp_path, reference_run, caplog):
    reference_dir, _expected = reference_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(reference_dir / "checkpoint-3", run_dir / "checkpoint-3")
    shutil.copytree(reference_dir / "checkpoint-6", run_dir / "checkpoint-6")
    (run_dir / "checkpoint-6" / CHECKPOINT_STATE_NAME).unlink()  # as a copy cut short, or another tool's checkpoint
    shutil.copytree(reference_dir / "checkpoint-3", run_dir / "checkpoint-9")
    (run_dir / "checkpoint-9" / "trainer_state.json").unlink()
    (run_dir / "checkpoint-12").write_text("not a folder")

    assert newest_checkpoint(run_dir) == str(run_dir / "checkpoint-3")
    assert "checkpoint-9: no trainer_state.json" in caplog.text
    assert f"checkpoint-6: no readable {CHECKPOINT_STATE_NAME}" in caplog.text
    assert newest_checkpoint(tmp_path / "missing") is None


def test_crash_after_heads_pretraining_skips_stage_1(tmp_path, monkeypatch, reference_pretraining_run, tiny_model_dir, gsm8k_files):
    run_dir = tmp_path / "run"
    config = dict(heads_pretraining=True, epochs=1, save_steps=2)
    with monkeypatch.context() as patch:
        add_callback(patch, CrashAtStep(1, run_dir))
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, **config))
    assert json.loads((run_dir / RUN_STAGE_NAME).read_text())["stage"] == "finetuning"
    assert newest_checkpoint(run_dir) is None
    stage_1_log = (run_dir / "heads_pretraining" / "loss_log.csv").read_text()

    calls = []
    monkeypatch.setattr(caft.train, "pretrain_heads", lambda *args, **kwargs: calls.append(args))
    run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, continue_from_checkpoint=True, **config))
    assert calls == []
    assert (run_dir / "heads_pretraining" / "loss_log.csv").read_text() == stage_1_log
    expected = train_losses(reference_pretraining_run / "loss_log.csv")
    assert sorted(expected) == [1, 2, 3]
    assert_same_losses(expected, train_losses(run_dir / "loss_log.csv"))
    for weights in ("adapter_model.safetensors", "heads/model.safetensors"):
        assert_same_weights(reference_pretraining_run / weights, run_dir / weights)


def test_sigterm_inside_heads_pretraining_then_resume(tmp_path, monkeypatch, reference_pretraining_run, tiny_model_dir, gsm8k_files):
    run_dir = tmp_path / "run"
    config = dict(heads_pretraining=True, epochs=1, save_steps=2)
    with monkeypatch.context() as patch:
        add_callback(patch, SignalAtStep(1, run_dir / "heads_pretraining"))
        with pytest.raises(TrainingInterrupted):
            run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, **config))
    checkpoint = run_dir / "heads_pretraining" / "checkpoint-1"
    assert read_checkpoint_state(checkpoint)["stage"] == "heads"
    assert not (checkpoint / "model.safetensors").exists()  # the frozen base is not copied into stage-1 checkpoints
    assert not (run_dir / "loss_log.csv").exists()

    run_train(make_config(tiny_model_dir, gsm8k_files[0], run_dir, continue_from_checkpoint=True, **config))
    for log in ("heads_pretraining/loss_log.csv", "loss_log.csv"):
        expected = train_losses(reference_pretraining_run / log)
        assert expected
        assert_same_losses(expected, train_losses(run_dir / log))
    for weights in ("heads_pretrained/model.safetensors", "adapter_model.safetensors", "heads/model.safetensors"):
        assert_same_weights(reference_pretraining_run / weights, run_dir / weights)


def test_resume_rejects_other_heads_pretraining_setting(tmp_path, tiny_model_dir, gsm8k_files):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_STAGE_NAME).write_text(json.dumps({"stage": "finetuning", "heads_pretrained": True}))
    config = make_config(tiny_model_dir, gsm8k_files[0], run_dir, continue_from_checkpoint=True)
    with pytest.raises(ValueError, match="started with --heads-pretraining"):
        caft.train._resumed_stage(config, run_dir)


def test_cli_exits_143_on_sigterm_with_checkpoint(tmp_path, tiny_model_dir, gsm8k_files):
    """A real `caft train` process: SIGTERM once it is training, then a complete checkpoint and exit code 143."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "caft.cli", "train", "-model", str(tiny_model_dir), "-ts", str(gsm8k_files[0]),
        "--prompt-field", "question", "--response-field", "answer", "-maxlen", "64", "-micro-bs", "1",
        "--max-steps", "100000", "--logging-steps", "1", "-heads", "1", "--output-dir", str(run_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "loss_log.csv").is_file():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.time() < deadline, "training did not start within 120 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    checkpoint = newest_checkpoint(run_dir)
    assert checkpoint is not None and "Training stopped by SIGTERM" in stderr
    assert not list(run_dir.glob(".staging-*"))
    assert not (run_dir / "adapter_model.safetensors").exists()  # an interrupted run writes no final outputs
