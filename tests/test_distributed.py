"""Multi-process training: DDP over gloo on the CPU, real launchers, and parameters that always get a gradient.

Run as a script, this file is the worker of the DDP comparison (one CAFTTrainer run of 2 optimizer
steps that records every gradient):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/test_distributed.py OUT 2 1

The tests compare its records with the same run in one process with the whole batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

NUM_HEADS = 3
VOCAB = 128
ROWS_PER_STEP = 4
REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
LOSS_TOLERANCE = 1e-5


# The worker ------------------------------------------------------------------------------------------


def worker_rows() -> list[dict]:
    """8 rows for 2 optimizer steps of 4 rows, read in order.

    With 2 processes and micro-batch 2, rows 2-3 (process 1, step 1) have no label at all. Rows 4-5
    (process 0, step 2) are labelled only at positions 1-3, so head 3 (target index t + 4) has no
    target on process 0, while process 1 has many.
    """
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(2 * ROWS_PER_STEP):
        ids = torch.randint(0, VOCAB, (12 - index % 3,), generator=generator).tolist()
        labels = [-100] * 2 + ids[2:]
        if index in (2, 3):
            labels = [-100] * len(ids)
        if index in (4, 5):
            labels = [-100] + ids[1:4] + [-100] * (len(ids) - 4)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


class GradientRecorder(TrainerCallback):
    """Before each optimizer step (gradients already reduced over processes), record every trainable gradient.

    Each process writes `rank<r>-step<s>.json` (trainable parameters without a gradient, and its own
    per-head target counts of the step); process 0 also writes `grads-step<s>.safetensors`.
    """

    def __init__(self, trainer, out_dir: Path):
        self.trainer, self.out_dir = trainer, out_dir

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        from safetensors.torch import save_file

        step = state.global_step + 1
        trainable = {name: p for name, p in self.trainer.model.named_parameters() if p.requires_grad}
        record = {
            "missing_grad": sorted(name for name, p in trainable.items() if p.grad is None),
            "local_counts": self.trainer._head_stats[:, 1].tolist(),
        }
        (self.out_dir / f"rank{args.process_index}-step{step}.json").write_text(json.dumps(record))
        if args.process_index == 0:
            grads = {name: p.grad.detach().clone().contiguous() for name, p in trainable.items() if p.grad is not None}
            save_file(grads, str(self.out_dir / f"grads-step{step}.safetensors"))


def run_worker(out_dir: Path, per_device_batch: int, accumulation: int) -> None:
    """Two steps of full fine-tuning with trainable heads; the schedule s(t) is 0 at step 1 and 1 at step 2."""
    from conftest import tiny_model  # the tests folder is on sys.path because it contains this script

    from caft.collator import CAFTCollator
    from caft.config import TrainConfig
    from caft.train import apply_finetune_method, make_trainer, setup_heads, training_arguments

    out_dir.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        model_name_or_path="tiny-llama",
        finetune_method="sft",
        finetune_heads=True,
        caft_num_heads=NUM_HEADS,
        caft_heads_coefficient=0.5,
        caft_scheduler="sine_0.5",  # sin(p / 0.5 * pi / 2): 0 at step 1 (p = 0), 1 at step 2 (p = 0.5)
        heads_pretraining=True,  # only silences the warning about heads that start as layer copies
    )
    model = tiny_model("llama", seed=0)
    setup_heads(model, config)
    model = apply_finetune_method(model, config)
    args = training_arguments(
        config,
        out_dir / "trainer",
        max_steps=2,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        train_sampling_strategy="sequential",
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        has_eval=False,
    )
    trainer = make_trainer(model, None, args, worker_rows(), [], CAFTCollator(pad_token_id=0))
    trainer.add_callback(GradientRecorder(trainer, out_dir))
    trainer.train()
    if args.process_index == 0:
        summary = {
            "world_size": args.world_size,
            "wrapper": type(trainer.model_wrapped).__name__,
            "logs": [entry for entry in trainer.state.log_history if "loss_head_0" in entry],
        }
        (out_dir / "summary.json").write_text(json.dumps(summary))
    # The DDP wrapper's reducer references the process group, so the wrapper must be freed when
    # `caft` closes the group at exit. A group freed during interpreter shutdown occasionally
    # aborted a worker ("terminate called without an active exception").
    from caft.cli import close_process_group

    wrapper = weakref.ref(trainer.model_wrapped)
    del trainer  # reference cycles (the recorder, the Trainer's callbacks) still reference it
    close_process_group()  # a no-op in the one-process reference run
    exit_record = {"wrapper_freed": wrapper() is None}
    (out_dir / f"rank{args.process_index}-exit.json").write_text(json.dumps(exit_record))


# The comparison --------------------------------------------------------------------------------------


def launch_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_checked(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    # Measured 40 s at load 8 and 100 s at load 16 on a shared 2-core machine; the limit only catches hangs.
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"
    return result


def load_run(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    summary = json.loads((out_dir / "summary.json").read_text())
    summary["grads"] = [load_file(str(out_dir / f"grads-step{step}.safetensors")) for step in (1, 2)]
    summary["ranks"] = {
        (rank, step): json.loads((out_dir / f"rank{rank}-step{step}.json").read_text())
        for rank in range(summary["world_size"])
        for step in (1, 2)
    }
    return summary


def head_of(name: str) -> str:
    """Name the part a parameter belongs to, for messages: `head k` or `trunk`."""
    if "caft_heads.heads." in name:
        return f"head {int(name.split('caft_heads.heads.')[1].split('.')[0]) + 1}"
    return "trunk"


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The reference: one process, micro-batch 4, run in this process."""
    out_dir = tmp_path_factory.mktemp("one-process")
    run_worker(out_dir, per_device_batch=ROWS_PER_STEP, accumulation=1)
    return load_run(out_dir)


@pytest.mark.parametrize("per_device_batch, accumulation", [(2, 1), (1, 2)])
def test_ddp_matches_one_process_per_head(tmp_path, one_process_run, per_device_batch, accumulation):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        __file__, str(tmp_path), str(per_device_batch), str(accumulation),
    ]
    run_checked(command)
    ddp = load_run(tmp_path)
    assert ddp["world_size"] == 2
    assert ddp["wrapper"] == "DistributedDataParallel"
    assert one_process_run["world_size"] == 1
    for rank in range(2):
        exit_record = json.loads((tmp_path / f"rank{rank}-exit.json").read_text())
        assert exit_record["wrapper_freed"], f"process {rank} kept its DDP wrapper after closing the group"

    # Every trainable parameter got a gradient on every process, at both steps (DDP runs with
    # find_unused_parameters=False): also at step 1, where the heads' coefficient is 0 and
    # process 1 has no target at all, and at step 2, where head 3 has no target on process 0.
    for (rank, step), record in ddp["ranks"].items():
        assert record["missing_grad"] == [], f"process {rank}, step {step}"
    if (per_device_batch, accumulation) == (2, 1):
        assert ddp["ranks"][(1, 1)]["local_counts"] == [0.0] * (NUM_HEADS + 1)
        assert ddp["ranks"][(0, 2)]["local_counts"][3] == 0
        assert ddp["ranks"][(1, 2)]["local_counts"][3] > 10

    for step, (expected, actual) in enumerate(zip(one_process_run["logs"], ddp["logs"]), start=1):
        for k in range(NUM_HEADS + 1):
            key = f"loss_head_{k}"
            assert abs(actual[key] - expected[key]) <= LOSS_TOLERANCE, f"step {step} {key}"
        assert abs(actual["loss"] - expected["loss"]) <= LOSS_TOLERANCE, f"step {step} loss"
    assert len(ddp["logs"]) == len(one_process_run["logs"]) == 2

    for step, (expected, actual) in enumerate(zip(one_process_run["grads"], ddp["grads"]), start=1):
        assert actual.keys() == expected.keys()
        for name, gradient in expected.items():
            assert torch.allclose(actual[name], gradient, rtol=GRAD_RTOL, atol=GRAD_ATOL), f"step {step}, {head_of(name)}: {name}"


def test_reference_gradients_follow_the_schedule(one_process_run):
    """s(t) = 0 at step 1 zeroes every head's gradient (still present); at step 2 each head learns."""
    step_1, step_2 = one_process_run["grads"]
    for k in range(1, NUM_HEADS + 1):
        names = [name for name in step_1 if head_of(name) == f"head {k}"]
        assert names
        assert all(step_1[name].abs().max() == 0 for name in names), f"head {k} moved at s = 0"
        assert any(step_2[name].abs().max() > 0 for name in names), f"head {k} got no gradient at s = 1"
    trunk = [name for name in step_1 if head_of(name) == "trunk"]
    assert any(step_1[name].abs().max() > 0 for name in trunk)


# Gradients reach every trainable parameter (single process) -------------------------------------------


def test_zero_terms_stay_attached_to_the_graph():
    """An all-masked batch and a zero head coefficient give zero gradients, never missing ones."""
    from conftest import tiny_model

    from caft.collator import CAFTCollator
    from caft.model import add_auxiliary_heads

    model = tiny_model("llama", seed=0)
    add_auxiliary_heads(model, num_heads=NUM_HEADS)
    rows = worker_rows()
    cases = {"all labels masked": rows[2:4], "head coefficient 0": rows[:2]}
    for case, batch_rows in cases.items():
        model.zero_grad(set_to_none=True)
        model.caft_state.schedule_value = 0.0 if case == "head coefficient 0" else 1.0
        batch = CAFTCollator(pad_token_id=0)(batch_rows)
        model(**batch).loss.backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None, f"{case}: {name} has no gradient"
            if name.startswith("caft_heads."):
                assert parameter.grad.abs().max() == 0, f"{case}: {name}"


@pytest.mark.parametrize("method", ["lora", "sft"])
def test_gradient_checkpointing_reaches_every_trainable_parameter(tmp_path, method):
    from conftest import tiny_model

    from caft.collator import CAFTCollator
    from caft.config import TrainConfig
    from caft.train import apply_finetune_method, make_trainer, setup_heads, training_arguments

    config = TrainConfig(
        model_name_or_path="tiny-llama", finetune_method=method, finetune_heads=True, caft_num_heads=2,
        gradient_checkpointing=True, heads_pretraining=True, lora_dropout=0.0,
    )
    model = tiny_model("llama", seed=0)
    setup_heads(model, config)
    model = apply_finetune_method(model, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = training_arguments(config, tmp_path, max_steps=1, save_strategy="no", disable_tqdm=True, has_eval=False)
    assert args.gradient_checkpointing
    assert not [str(warning.message) for warning in caught if "is deprecated" in str(warning.message)]
    trainer = make_trainer(model, None, args, worker_rows()[:4], [], CAFTCollator(pad_token_id=0))
    recorder = GradientRecorder(trainer, tmp_path)
    trainer.add_callback(recorder)
    trainer.train()

    assert unwrap_checkpointing(trainer.model), "gradient checkpointing was not switched on"
    record = json.loads((tmp_path / "rank0-step1.json").read_text())
    assert record["missing_grad"] == []
    from safetensors.torch import load_file

    grads = load_file(str(tmp_path / "grads-step1.safetensors"))
    if method == "lora":
        assert grads and all("lora_" in name for name in grads)
        assert any(name.startswith("base_model.model.caft_heads.") for name in grads)  # -ft-heads puts LoRA on heads
        # lora_B starts at zero, so lora_A's first gradient is zero; lora_B's is not.
        assert all(grads[name].abs().max() > 0 for name in grads if "lora_B" in name)
    else:
        assert all(grads[name].abs().max() > 0 for name in grads if "caft_heads" not in name)


def unwrap_checkpointing(model) -> bool:
    from caft.model import unwrap_causal_lm

    return bool(getattr(unwrap_causal_lm(model), "is_activation_checkpointing", False))


# Real launchers ----------------------------------------------------------------------------------------


def cli_args(model_dir: Path, train_file: Path, out_dir: Path) -> list[str]:
    """8 rows, micro-batch 2, 2 optimizer steps, no held-out set."""
    return [
        "-model", str(model_dir), "-ts", str(train_file), "-sz", "8", "--prompt-field", "question",
        "--response-field", "answer", "-maxlen", "256", "-micro-bs", "2", "--max-steps", "2",
        "--logging-steps", "1", "-heads", "2", "--output-dir", str(out_dir),
    ]


def logged_epochs(run_dir: Path) -> list[float]:
    import csv

    with open(run_dir / "loss_log.csv", newline="") as handle:
        return [float(row["epoch"]) for row in csv.DictReader(handle) if row["split"] == "train" and row.get("loss")]


def test_torchrun_caft_train(tmp_path, tiny_model_dir, gsm8k_files):
    caft = Path(sys.executable).parent / "caft"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(caft), "train"]
    run_checked(command + cli_args(tiny_model_dir, gsm8k_files[0], tmp_path / "run"))
    # 2 processes x 2 rows of 8 per step: half an epoch per step (one process would log 0.25, 0.5).
    assert logged_epochs(tmp_path / "run") == [0.5, 1.0]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "heads" / "model.safetensors").is_file()


def test_accelerate_launch_caft_train_heads(tmp_path, tiny_model_dir, gsm8k_files):
    accelerate = Path(sys.executable).parent / "accelerate"
    config = REPO / "configs" / "accelerate" / "ddp.yaml"
    command = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", "2", "-m", "caft.cli", "train-heads"]
    run_checked(command + cli_args(tiny_model_dir, gsm8k_files[0], tmp_path / "run"))
    assert logged_epochs(tmp_path / "run") == [0.5, 1.0]
    assert json.loads((tmp_path / "run" / "heads" / "config.json").read_text())["num_heads"] == 2


# Shipped accelerate configs -------------------------------------------------------------------------


def test_accelerate_configs_parse_with_known_keys():
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    names = {path.stem for path in ACCELERATE_CONFIGS}
    assert {"ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"} <= names
    options = {action.dest for action in launch_command_parser()._actions}
    for path in ACCELERATE_CONFIGS:
        raw = yaml.safe_load(path.read_text())
        ClusterConfig.from_yaml_file(str(path))  # rejects unknown top-level keys
        for section in ("fsdp_config", "deepspeed_config"):
            unknown = sorted(set(raw.get(section) or {}) - options)
            assert not unknown, f"{path.name}: {section} keys accelerate does not know: {unknown}"
        args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "caft.cli", "train"])
        args, defaults, _ = _validate_launch_command(args)
        assert defaults.distributed_type.value == raw["distributed_type"]


def test_fsdp_without_gpu_warns(tmp_path, monkeypatch, caplog):
    """accelerate launch with fsdp2.yaml sets ACCELERATE_USE_FSDP; on CPU, training is plain DDP."""
    from caft.config import TrainConfig
    from caft.train import training_arguments

    monkeypatch.setattr("caft.train._has_accelerator", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level("WARNING", logger="caft.train"):
        training_arguments(TrainConfig(), tmp_path, has_eval=False)

    assert any("parameters are not sharded" in record.getMessage() for record in caplog.records)


def test_deepspeed_without_package_is_a_clear_error(tmp_path, monkeypatch):
    """accelerate launch with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED; without the package, one clear message."""
    import importlib.util

    from caft.config import TrainConfig
    from caft.train import training_arguments

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here, so there is no missing package to report")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="the deepspeed package is not installed"):
        training_arguments(TrainConfig(), tmp_path, has_eval=False)


def test_sharded_configs_keep_full_loading():
    """Heads copy the last decoder layer before sharding; loading must not leave it empty or partitioned."""
    import yaml

    fsdp = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp2.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False  # accelerate's default (true) loads meta tensors
    for stage in (2, 3):
        deepspeed = yaml.safe_load((REPO / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text())
        assert deepspeed["deepspeed_config"]["zero_stage"] == stage
        assert deepspeed["deepspeed_config"]["zero3_init_flag"] is False


if __name__ == "__main__":
    run_worker(Path(sys.argv[1]), per_device_batch=int(sys.argv[2]), accumulation=int(sys.argv[3]))
