"""Mistyped, missing, truncated and mismatched paths given to the `caft` commands.

Each case runs the real command line and expects one `caft CMD: error: ...` line that names the
path and the fix, with exit code 2, instead of a traceback or a misleading hub error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_model

from caft.cli import EXIT_INPUT_ERROR, main


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Run `caft ARGV` and return (exit code, stderr)."""
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, tiny_model_dir):
    """A heads folder of 2 transformer heads built for the tiny Llama."""
    from transformers import AutoModelForCausalLM

    from caft.heads import HeadsConfig, build_heads, save_heads

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    folder = tmp_path_factory.mktemp("heads")
    save_heads(build_heads(model, HeadsConfig(num_heads=2)), folder)
    return folder


@pytest.fixture
def truncated_heads_dir(tmp_path, heads_dir):
    """A copy of the heads folder whose model.safetensors is cut after 100 bytes."""
    folder = tmp_path / "heads"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((heads_dir / name).read_bytes())
    truncate(folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter folder of the tiny Llama, with adapter_config.json naming that folder as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    return folder


def copy_adapter(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    return target


# Truncated safetensors files --------------------------------------------------------------------


def test_eval_heads_truncated_heads(capsys, tiny_model_dir, gsm8k_files, truncated_heads_dir, tmp_path):
    code, err = run_cli(
        capsys, "eval-heads", "-model", tiny_model_dir, "--heads", truncated_heads_dir, "--data", gsm8k_files[1],
        "--prompt-field", "question", "--response-field", "answer", "-maxlen", 256, "--out", tmp_path / "eval",
    )

    assert code == EXIT_INPUT_ERROR
    assert f"{truncated_heads_dir / 'model.safetensors'} is not a valid safetensors file" in err
    assert "truncated or corrupt" in err
    assert "Traceback" not in err


def test_eval_heads_truncated_safetensors_file(capsys, tiny_model_dir, gsm8k_files, truncated_heads_dir, tmp_path):
    weights = truncated_heads_dir / "model.safetensors"
    code, err = run_cli(
        capsys, "eval-heads", "-model", tiny_model_dir, "--heads", weights, "--data", gsm8k_files[1],
        "--prompt-field", "question", "--response-field", "answer", "-maxlen", 256, "--out", tmp_path / "eval",
    )

    assert code == EXIT_INPUT_ERROR
    assert f"{weights} is not a valid safetensors file" in err


def test_train_truncated_heads(capsys, tiny_model_dir, gsm8k_files, truncated_heads_dir, tmp_path):
    train_file, test_file = gsm8k_files
    code, err = run_cli(
        capsys, "train", "-model", tiny_model_dir, "-ts", train_file, "-es", test_file, "--prompt-field", "question",
        "--response-field", "answer", "-maxlen", 256, "-hdir", truncated_heads_dir, "--output-dir", tmp_path / "run",
    )

    assert code == EXIT_INPUT_ERROR
    assert f"{truncated_heads_dir / 'model.safetensors'} is not a valid safetensors file" in err


def test_generate_truncated_heads(capsys, tiny_model_dir, truncated_heads_dir):
    code, err = run_cli(capsys, "generate", "-model", tiny_model_dir, "--heads", truncated_heads_dir, "--prompt", "Hi")

    assert code == EXIT_INPUT_ERROR
    assert f"{truncated_heads_dir / 'model.safetensors'} is not a valid safetensors file" in err


@pytest.mark.parametrize(
    "command",
    [
        ["export", "{run}", "--out", "{tmp}/export"],
        ["eval", "{run}", "--task", "gsm8k", "--data", "{data}", "--out", "{tmp}/eval"],
        ["generate", "-model", "{run}", "--heads", "{heads}", "--prompt", "hi"],
    ],
    ids=["export", "eval", "generate"],
)
def test_truncated_adapter_is_named(capsys, adapter_dir, heads_dir, gsm8k_files, tmp_path, command):
    run = copy_adapter(adapter_dir, tmp_path / "run")
    truncate(run / "adapter_model.safetensors")
    places = {"{run}": str(run), "{tmp}": str(tmp_path), "{data}": str(gsm8k_files[1]), "{heads}": str(heads_dir)}
    arguments = []
    for value in command:
        for key, place in places.items():
            value = value.replace(key, place)
        arguments.append(value)

    code, err = run_cli(capsys, *arguments)

    assert code == EXIT_INPUT_ERROR
    assert f"{run / 'adapter_model.safetensors'} is not a valid safetensors file" in err
    assert not (tmp_path / "export").exists()


def truncated_model_copy(source: Path, target: Path) -> Path:
    """A copy of a model folder whose model.safetensors is cut after 100 bytes."""
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    truncate(target / "model.safetensors")
    return target


def test_eval_truncated_model_weights(capsys, tiny_model_dir, gsm8k_files, tmp_path):
    model_dir = truncated_model_copy(tiny_model_dir, tmp_path / "model")

    code, err = run_cli(capsys, "eval", model_dir, "--task", "gsm8k", "--data", gsm8k_files[1], "--out", tmp_path / "eval")

    assert code == EXIT_INPUT_ERROR
    assert f"{model_dir / 'model.safetensors'} is not a valid safetensors file" in err


def test_export_truncated_full_model(capsys, tiny_model_dir, tmp_path):
    model_dir = truncated_model_copy(tiny_model_dir, tmp_path / "model")

    code, err = run_cli(capsys, "export", model_dir, "--out", tmp_path / "export")

    assert code == EXIT_INPUT_ERROR
    assert f"{model_dir / 'model.safetensors'} is not a valid safetensors file" in err
    assert not (tmp_path / "export").exists()


# caft export ------------------------------------------------------------------------------------


def test_export_base_of_other_size(capsys, adapter_dir, tmp_path, smol_tokenizer):
    other = tmp_path / "wide-llama"
    tiny_model("llama", vocab_size=len(smol_tokenizer), hidden_size=64).save_pretrained(other)

    code, err = run_cli(capsys, "export", adapter_dir, "--out", tmp_path / "export", "--base-model", other)

    error_lines = [line for line in err.splitlines() if line.startswith("caft export: error:")]
    assert code == EXIT_INPUT_ERROR
    assert len(error_lines) == 1
    assert "does not fit the base model" in error_lines[0]
    assert str(adapter_dir) in error_lines[0]
    assert str(other) in error_lines[0]
    assert "--base-model" in error_lines[0]
    assert "Traceback" not in err


def test_export_missing_run_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "export", tmp_path / "nowhere", "--out", tmp_path / "export")

    assert code == EXIT_INPUT_ERROR
    assert f"{tmp_path / 'nowhere'} does not exist" in err
    assert "neither" not in err


def test_export_broken_adapter_config(capsys, adapter_dir, tmp_path):
    run = copy_adapter(adapter_dir, tmp_path / "run")
    (run / "adapter_config.json").write_text("{\n", encoding="utf-8")

    code, err = run_cli(capsys, "export", run, "--out", tmp_path / "export")

    assert code == EXIT_INPUT_ERROR
    assert str(run / "adapter_config.json") in err
    assert "invalid JSON" in err


def test_export_adapter_base_missing(capsys, adapter_dir, tmp_path):
    run = copy_adapter(adapter_dir, tmp_path / "run")
    config = json.loads((run / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-base")
    (run / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")

    code, err = run_cli(capsys, "export", run, "--out", tmp_path / "export")

    assert code == EXIT_INPUT_ERROR
    assert f"base model {tmp_path / 'moved-base'} named in {run / 'adapter_config.json'} was not found" in err
    assert "--base-model" in err
    assert "Repo id" not in err


def test_export_out_is_file(capsys, adapter_dir, tmp_path):
    out = tmp_path / "taken.txt"
    out.write_text("keep me\n", encoding="utf-8")

    code, err = run_cli(capsys, "export", adapter_dir, "--out", out)

    assert code == EXIT_INPUT_ERROR
    assert f"{out} is a file" in err
    assert "Errno" not in err
    assert out.read_text(encoding="utf-8") == "keep me\n"


# Model paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, make_folder, expected, misleading",
    [
        ("nomodel", False, "model path {path} does not exist", "Repo id"),
        ("empty-model", True, "{path} has no config.json", "sentencepiece"),
    ],
    ids=["missing", "no-config"],
)
def test_inspect_bad_model_path(capsys, tmp_path, gsm8k_files, name, make_folder, expected, misleading):
    path = tmp_path / name
    if make_folder:
        path.mkdir()

    code, err = run_cli(capsys, "inspect-data", gsm8k_files[0], "-model", path, "--prompt-field", "question",
                        "--response-field", "answer")

    assert code == EXIT_INPUT_ERROR
    assert expected.format(path=path) in err
    assert misleading not in err


def test_train_model_is_data_file(capsys, tmp_path, gsm8k_files, monkeypatch):
    train_file, test_file = gsm8k_files
    monkeypatch.chdir(train_file.parent)

    code, err = run_cli(capsys, "train", "-model", train_file.name, "-ts", train_file, "-es", test_file,
                        "--prompt-field", "question", "--response-field", "answer", "--output-dir", tmp_path / "run")

    assert code == EXIT_INPUT_ERROR
    assert f"{train_file.name} is a file, not a model folder" in err
    assert "not a valid JSON file" not in err


def test_eval_folder_without_config(capsys, tmp_path, gsm8k_files):
    folder = tmp_path / "notrun"
    folder.mkdir()

    code, err = run_cli(capsys, "eval", folder, "--task", "gsm8k", "--data", gsm8k_files[1], "--out", tmp_path / "eval")

    assert code == EXIT_INPUT_ERROR
    assert f"{folder} has no config.json" in err
    assert "model_type" not in err


def test_generate_adapter_base_missing(capsys, adapter_dir, tmp_path):
    run = copy_adapter(adapter_dir, tmp_path / "run")
    config = json.loads((run / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-base")
    (run / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")

    code, err = run_cli(capsys, "generate", "-model", run, "--prompt", "Hi")

    assert code == EXIT_INPUT_ERROR
    assert f"The base model {tmp_path / 'moved-base'} named in {run / 'adapter_config.json'} was not found" in err
    assert "--base-model" not in err.split("caft export")[0]  # generate has no --base-model flag


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct-nonexistent", "gpt2-nonexistent"])
def test_hub_id_not_local_path(name, tmp_path, monkeypatch):
    from caft.loading import check_model_path

    monkeypatch.chdir(tmp_path)

    check_model_path(name)  # a hub id is left to from_pretrained


def test_local_path_check_cases(tmp_path, tiny_model_dir, adapter_dir, monkeypatch):
    from caft.loading import check_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()

    check_model_path(str(tiny_model_dir))
    check_model_path(str(adapter_dir))
    with pytest.raises(FileNotFoundError, match="model path org/typo does not exist"):
        check_model_path("org/typo")
    with pytest.raises(FileNotFoundError, match="model path ./typo does not exist"):
        check_model_path("./typo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_path("~/caft-no-such-model-folder")
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        check_model_path(str(tmp_path / "model.gguf"))


def test_smollm2_alias_still_loads(capsys, gsm8k_files):
    code = main(["inspect-data", str(gsm8k_files[0]), "-model", "smollm2", "-n", "1",
                 "--prompt-field", "question", "--response-field", "answer"])

    assert code == 0


# Heads paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parent-exists", "dot-relative", "absolute"])
def test_heads_path_typo_not_hub(capsys, kind, tiny_model_dir, gsm8k_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "heads").mkdir()
    typo = {"parent-exists": "heads/nope", "dot-relative": "./nope", "absolute": str(tmp_path / "missing" / "nope")}[kind]

    code, err = run_cli(
        capsys, "eval-heads", "-model", tiny_model_dir, "--heads", typo, "--data", gsm8k_files[1],
        "--prompt-field", "question", "--response-field", "answer", "-maxlen", 256, "--out", tmp_path / "eval",
    )

    assert code == EXIT_INPUT_ERROR
    assert f"heads path {typo} does not exist" in err
    assert "Could not download" not in err


# Outputs ----------------------------------------------------------------------------------------


def test_eval_refuses_existing_results(capsys, tiny_model_dir, gsm8k_files, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval_results.json").write_text('{"accuracy": 0.5}\n', encoding="utf-8")

    code, err = run_cli(capsys, "eval", tiny_model_dir, "--task", "loss", "--data", gsm8k_files[1],
                        "--prompt-field", "question", "--response-field", "answer", "--max-length", 64, "--out", out)

    assert code == EXIT_INPUT_ERROR
    assert str(out / "eval_results.json") in err
    assert "--overwrite" in err
    assert (out / "eval_results.json").read_text(encoding="utf-8") == '{"accuracy": 0.5}\n'


def test_eval_overwrite_replaces_results(capsys, tiny_model_dir, gsm8k_files, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval_results.json").write_text('{"accuracy": 0.5}\n', encoding="utf-8")

    code = main(["eval", str(tiny_model_dir), "--task", "loss", "--data", str(gsm8k_files[1]),
                 "--prompt-field", "question", "--response-field", "answer", "--max-length", "64",
                 "--out", str(out), "--overwrite", "--limit", "2"])

    assert code == 0
    assert "loss" in json.loads((out / "eval_results.json").read_text(encoding="utf-8"))


def test_eval_out_is_file(capsys, tiny_model_dir, gsm8k_files, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("keep me\n", encoding="utf-8")

    code, err = run_cli(capsys, "eval", tiny_model_dir, "--task", "gsm8k", "--data", gsm8k_files[1], "--out", out)

    assert code == EXIT_INPUT_ERROR
    assert f"{out} is a file" in err


def test_eval_heads_out_is_file(capsys, tiny_model_dir, gsm8k_files, heads_dir, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("keep me\n", encoding="utf-8")

    code, err = run_cli(
        capsys, "eval-heads", "-model", tiny_model_dir, "--heads", heads_dir, "--data", gsm8k_files[1],
        "--prompt-field", "question", "--response-field", "answer", "-maxlen", 256, "--out", out,
    )

    assert code == EXIT_INPUT_ERROR
    assert f"{out} is a file" in err
    assert "Errno" not in err


def test_plot_non_utf8_log(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "loss_log.csv").write_bytes(b"step,split,loss\n1,train,\xff\xfe\n")

    code, err = run_cli(capsys, "plot", run)

    assert code == EXIT_INPUT_ERROR
    assert str(run / "loss_log.csv") in err
    assert "UTF-8" in err
