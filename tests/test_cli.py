"""The `caft` command in real subprocesses: help, a full run with a tiny model, input errors and config files."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from caft.config import TrainConfig, load_config
from caft.cli import build_parser

ORIGINAL_FLAGS = [
    "--model-name-or-path", "-model", "--model-max-length", "-maxlen", "--finetune-method", "-ftm",
    "--learning-rate", "-lr", "--epochs", "-e", "--freeze-unembedding", "-fr-unembed",
    "--per-device-batch-size", "-micro-bs", "--gradient-accumulation-steps", "-grad-acc",
    "--heads-pretraining", "-hpretrain", "--finetune-heads", "-ft-heads", "--train-set", "-ts",
    "--eval-set", "-es", "--size", "-sz", "--eval-size", "-esz", "--mode", "-m", "--weight-decay", "-wd",
    "--optimizer", "-optim", "--lr-scheduler-type", "-lr-sched", "--warmup-steps", "-warmup",
    "--caft-num-heads", "-heads", "--caft-num-layers", "-layers", "--caft-heads-coefficient", "-hcoef",
    "--caft-decay-coefficient", "-decay", "--caft-scheduler", "-sched", "--auxiliary-heads-dir", "-hdir",
    "--separate-unembed", "-sepunembed", "--head-arch", "-harch", "--pretrain-bs-multiplier",
    "-heads-bs-multi", "--lora-r", "-r", "--lora-alpha", "-a", "--lora-dropout", "-dropout",
    "--lora-target-modules", "-lora-target", "--heads-r-multiplier", "-r-multi", "--load-in-8bit", "-8bit",
    "--load-in-4bit", "-4bit", "--gradient-checkpointing", "-grad-ckpt", "--continue-from-checkpoint",
    "-cont-ckpt", "--caft-save-combined-model", "-save-combined", "--output-dir", "--max-steps", "--seed",
    "--head-wiring", "--config", "--report-to",
]


def run_caft(*args, cwd=None, timeout=600):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "caft.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )


def test_help_lists_every_original_flag():
    result = run_caft("train", "--help")
    assert result.returncode == 0
    for flag in ORIGINAL_FLAGS:
        assert f"{flag} " in result.stdout or f"{flag}," in result.stdout or f"{flag}\n" in result.stdout, flag


def test_short_and_long_flags_parse_to_the_same_config():
    parser = build_parser()
    short = load_config(parser.parse_args(["train", "-ftm", "sft", "-lr", "5e-6", "-fr-unembed", "-heads", "3",
                                           "-sched", "sine_0.5", "-micro-bs", "2", "-grad-acc", "4"]))
    long = load_config(parser.parse_args(["train", "--finetune-method", "sft", "--learning-rate", "5e-6",
                                          "--freeze-unembedding", "--caft-num-heads", "3", "--caft-scheduler",
                                          "sine_0.5", "--per-device-batch-size", "2",
                                          "--gradient-accumulation-steps", "4"]))
    assert short == long
    assert short.learning_rate == 5e-6 and short.freeze_unembedding and short.caft_num_heads == 3


def test_yaml_config_is_overridden_by_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 0.001\nlora_r: 32\ncaft_scheduler: linear\n")
    parser = build_parser()
    config = load_config(parser.parse_args(["train", "--config", str(tmp_path / "run.yaml"), "-r", "4"]))
    assert config.learning_rate == 0.001
    assert config.lora_r == 4
    assert config.caft_scheduler == "linear"
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.001\n")
    with pytest.raises(ValueError, match="unknown settings \\['learning_rat'\\]"):
        load_config(parser.parse_args(["train", "--config", str(tmp_path / "bad.yaml")]))


def test_invalid_values_are_rejected():
    with pytest.raises(ValueError, match="--caft-scheduler"):
        TrainConfig(caft_scheduler="cosine")
    with pytest.raises(ValueError, match=r"r must be in \(0, 1\]"):
        TrainConfig(caft_scheduler="sine_2")
    with pytest.raises(ValueError, match="--freeze-unembedding applies to -ftm sft"):
        TrainConfig(freeze_unembedding=True, finetune_method="lora")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"learning_rate": float("inf")}, "--learning-rate must be a finite number, got inf"),
        ({"caft_heads_coefficient": float("nan")}, "--caft-heads-coefficient must be a finite number, got nan"),
        ({"epochs": float("inf"), "max_steps": -1}, "--epochs must be a finite number"),
        ({"caft_heads_coefficient": -1.0}, "--caft-heads-coefficient must be at least 0"),
        ({"caft_decay_coefficient": -0.5}, "--caft-decay-coefficient must be at least 0"),
        ({"weight_decay": -0.1}, "--weight-decay must be at least 0"),
        ({"lora_alpha": 0}, "--lora-alpha must be positive"),
        ({"lora_dropout": -0.5}, "--lora-dropout must be at least 0 and below 1"),
        ({"max_steps": 0}, "--max-steps must be at least 1, or -1"),
        ({"save_steps": 0}, "--save-steps must be at least 1"),
        ({"eval_steps": 0}, "--eval-steps must be at least 1"),
        ({"save_total_limit": 0}, "--save-total-limit must be at least 1"),
    ],
)
def test_values_that_train_nothing_are_rejected(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**values)


@pytest.mark.parametrize(
    "text, message",
    [
        ("finetune_method: qlora\n", "finetune_method must be one of lora, sft, got 'qlora'"),
        ("mode: baseline\n", "mode must be one of caft, default, got 'baseline'"),
        ("learning_rate: [1\n", "is not valid YAML"),
        ("lora_target_modules: 7\n", "lora_target_modules must be a list"),
    ],
    ids=["method", "mode", "syntax", "list"],
)
def test_yaml_config_values_are_checked(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        load_config(build_parser().parse_args(["train", "--config", str(path)]))
    assert str(path) in str(raised.value)


def test_yaml_single_target_module_is_a_list(tmp_path):
    (tmp_path / "run.yaml").write_text("lora_target_modules: q_proj\n")
    config = load_config(build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml")]))
    assert config.lora_target_modules == ["q_proj"]


def tiny_run_args(model_dir, gsm8k_files, out, *extra):
    train, test = gsm8k_files
    return ["train", "-model", model_dir, "-ts", train, "-es", test, "--prompt-field", "question",
            "--response-field", "answer", "-maxlen", "128", "-micro-bs", "4", "--max-steps", "2",
            "--logging-steps", "1", "--output-dir", out, *extra]


def test_lora_run_with_heads_pretraining_writes_every_output(tiny_model_dir, gsm8k_files, tmp_path):
    out = tmp_path / "run"
    result = run_caft(*tiny_run_args(tiny_model_dir, gsm8k_files, out, "-ftm", "lora", "-hpretrain", "-ft-heads",
                                     "-r-multi", "2", "-save-combined"))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "loss_log.csv", "metrics.json", "adapter_config.json", "adapter_model.safetensors",
                 "heads/config.json", "heads/model.safetensors", "heads_pretrained/model.safetensors",
                 "chat_template.jinja", "merged/model.safetensors"):
        assert (out / name).is_file(), name
    adapter_keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert adapter_keys and not [key for key in adapter_keys if "caft_heads" in key]
    merged_keys = load_file(str(out / "merged" / "model.safetensors")).keys()
    assert not [key for key in merged_keys if "caft_heads" in key or "lora" in key]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["eval_loss_by_head"]) == 5
    assert len(metrics["eval_before"]["eval_loss_by_head"]) == 5
    train_stats = metrics["data"]["train"]
    assert train_stats["rows_read"] == 16
    assert train_stats["rows_kept"] + sum(train_stats["skipped"].values()) == 16
    if train_stats["skipped"]:
        assert "truncation" in " ".join(train_stats["skipped"]) and "truncation" in result.stderr
    assert "held-out before" in result.stdout and "held-out after" in result.stdout
    # The heads trained in stage 2 with LoRA are saved merged, so they differ from the pretrained ones.
    pretrained = load_file(str(out / "heads_pretrained" / "model.safetensors"))
    final = load_file(str(out / "heads" / "model.safetensors"))
    assert pretrained.keys() == final.keys()
    assert any(not (pretrained[key] == final[key]).all() for key in pretrained)


def test_full_finetuning_with_frozen_unembedding(tiny_model_dir, gsm8k_files, tmp_path):
    out = tmp_path / "run"
    result = run_caft(*tiny_run_args(tiny_model_dir, gsm8k_files, out, "-ftm", "sft", "-lr", "1e-3", "-fr-unembed",
                                     "-heads", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert not [key for key in after if "caft_heads" in key]
    assert (before["model.embed_tokens.weight"] == after["model.embed_tokens.weight"]).all()
    assert not (before["model.layers.0.mlp.up_proj.weight"] == after["model.layers.0.mlp.up_proj.weight"]).all()


def test_default_mode_runs_next_token_baseline(tiny_model_dir, gsm8k_files, tmp_path):
    out = tmp_path / "run"
    result = run_caft(*tiny_run_args(tiny_model_dir, gsm8k_files, out, "--mode", "default"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["eval_loss_by_head"]) == 1
    assert not (out / "heads").exists()


def test_bad_data_exits_2_naming_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n')
    result = run_caft("train", "-model", tiny_model_dir, "-ts", bad, "--prompt-field", "question",
                      "--response-field", "answer", "--output-dir", tmp_path / "out")
    assert result.returncode == 2
    assert "bad.jsonl" in result.stderr and "line 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_output_dir_that_is_a_file_is_rejected(tiny_model_dir, gsm8k_files, tmp_path):
    target = tmp_path / "afile"
    target.write_text("keep me")

    result = run_caft(*tiny_run_args(tiny_model_dir, gsm8k_files, target))
    assert result.returncode == 2
    assert f"{target} is a file. Pass a folder with --output-dir" in result.stderr
    assert target.read_text() == "keep me"


def test_existing_output_dir_is_not_overwritten(tiny_model_dir, gsm8k_files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("important")
    result = run_caft(*tiny_run_args(tiny_model_dir, gsm8k_files, out))
    assert result.returncode == 2
    assert "exists and is not empty" in result.stderr
    assert (out / "keep.txt").read_text() == "important"


def test_quantized_loading_on_cpu_is_a_clear_error(tiny_model_dir, gsm8k_files, tmp_path):
    result = run_caft(*tiny_run_args(tiny_model_dir, gsm8k_files, tmp_path / "run", "-4bit"))
    assert result.returncode == 2
    assert "need a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_heads_command_saves_heads_each_epoch(tiny_model_dir, gsm8k_files, tmp_path):
    train, test = gsm8k_files
    out = tmp_path / "heads-run"
    result = run_caft("train-heads", "-model", tiny_model_dir, "-ts", train, "-es", test, "--prompt-field", "question",
                      "--response-field", "answer", "-maxlen", "128", "-micro-bs", "8", "-e", "2", "-heads", "3",
                      "-ftm", "sft", "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--finetune-method sft is ignored" in result.stderr
    for name in ("heads/config.json", "heads/README.md", "heads-epoch-1/model.safetensors",
                 "heads-epoch-2/model.safetensors"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["eval_before"]["eval_loss_by_head"], metrics["eval"]["eval_loss_by_head"]
    assert before[0] == pytest.approx(after[0], rel=1e-6)  # the base model is frozen
    assert sum(after[1:]) < sum(before[1:])  # the heads learned


def test_yaml_numbers_without_dot_are_converted(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 1e-4\nlora_r: '16'\nheads_pretraining: true\n")
    config = load_config(build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml")]))
    assert config.learning_rate == 1e-4 and config.lora_r == 16 and config.heads_pretraining is True
    (tmp_path / "bad.yaml").write_text("learning_rate: fast\n")
    with pytest.raises(ValueError, match="learning_rate must be a number"):
        load_config(build_parser().parse_args(["train", "--config", str(tmp_path / "bad.yaml")]))


# A command that opens a one-process gloo group, keeps a DDP wrapper in a reference cycle (as the
# Trainer does) and ends in the way MODE names. It prints whether the wrapper was still alive when
# `caft.cli` closed the group.
EXIT_PATH_SCRIPT = """
import argparse, sys, weakref
import torch, torch.distributed as dist
import caft.cli as cli
from caft.checkpoint import TrainingInterrupted

mode, store = sys.argv[1], sys.argv[2]
wrapper = {}

def handler(args):
    dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    holder = {"wrapped": torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))}
    holder["self"] = holder  # a reference cycle
    wrapper["ref"] = weakref.ref(holder["wrapped"])
    errors = {"signal": TrainingInterrupted(15, "checkpoint-1"), "keyboard": KeyboardInterrupt(),
              "runtime": RuntimeError("boom"), "verbose-value": ValueError("bad input")}
    if mode in errors:
        raise errors[mode]
    return 0

def build_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--verbose", action="store_true")
    parser.add_subparsers(dest="command").add_parser("probe").set_defaults(handler=handler)
    return parser

destroy = dist.destroy_process_group
def reporting_destroy(*args, **kwargs):
    print("alive at close:", wrapper["ref"]() is not None, flush=True)
    destroy(*args, **kwargs)
dist.destroy_process_group = reporting_destroy
cli.build_parser = build_parser
sys.exit(cli.main(["--verbose", "probe"] if mode == "verbose-value" else ["probe"]))
"""


@pytest.mark.parametrize(
    "mode, code",
    [("return", 0), ("signal", 143), ("keyboard", 130), ("runtime", 1), ("verbose-value", 1)],
)
def test_process_group_closes_after_wrapper_freed(tmp_path, mode, code):
    """On every way out of a command, the DDP wrapper is freed before the process group is destroyed."""
    completed = subprocess.run(
        [sys.executable, "-c", EXIT_PATH_SCRIPT, mode, str(tmp_path / "store")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    assert completed.returncode == code, completed.stderr[-2000:]
    assert "alive at close: False" in completed.stdout, completed.stdout + completed.stderr[-2000:]


def test_heads_folder_settings_win_with_warning(tiny_model_dir, gsm8k_files, tmp_path, caplog):
    """-hdir heads with 2 heads and -heads 3 on the command line: 2 heads train, config.yaml records 2, and a warning explains why."""
    from transformers import AutoModelForCausalLM

    from caft.heads import HeadsConfig, build_heads, save_heads
    from caft.train import run_train

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    save_heads(build_heads(base, HeadsConfig(num_heads=2)), tmp_path / "heads")
    config = TrainConfig(
        model_name_or_path=str(tiny_model_dir), train_set=str(gsm8k_files[0]), prompt_field="question",
        response_field="answer", size=4, model_max_length=128, max_steps=1, caft_num_heads=3,
        auxiliary_heads_dir=str(tmp_path / "heads"), output_dir=str(tmp_path / "run"), eval_before_training=False,
    )
    with caplog.at_level("WARNING", logger="caft.train"):
        run_train(config)

    assert any(record.getMessage().startswith("--caft-num-heads 3 is ignored") for record in caplog.records)
    assert "caft_num_heads: 2" in (tmp_path / "run" / "config.yaml").read_text()
    assert json.loads((tmp_path / "run" / "heads" / "config.json").read_text())["num_heads"] == 2
