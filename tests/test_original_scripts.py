"""The original CAFT README commands (`scripts/train.py`, `scripts/train_aux_heads.py`) on top of `caft`.

The scripts run with a tiny model and data written into a temporary copy of the repository
layout, found through $CAFT_REPO_ROOT. The hub is never contacted: HF_HUB_OFFLINE is set, or
the hub endpoint points at a loopback port.
"""

import json
import os
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from caft import cli
from caft.config import TrainConfig
from caft.data import read_conversations
from caft.original import (
    ORIGINAL_MODEL,
    PUBLISHED_HEADS,
    PUBLISHED_HEADS_WIRING,
    check_hub_reachable,
)

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_REPO = PUBLISHED_HEADS[ORIGINAL_MODEL]
# Flags that shrink a run to seconds; the README flags come after them.
TINY_RUN = ["--max-steps", "1", "-micro-bs", "2", "-maxlen", "160", "-esz", "4", "--logging-steps", "1"]
README_COMMANDS = [
    ["-ftm", "lora"],
    ["-ftm", "lora", "-ft-heads", "-hpretrain"],
    ["-ftm", "sft", "-lr", "5e-6", "-fr-unembed"],
    ["-ftm", "sft", "-lr", "5e-6", "-fr-unembed", "-ft-heads", "-hpretrain"],
]


def _original_rows(gsm8k_path: Path) -> list[dict]:
    rows = []
    for index, line in enumerate(gsm8k_path.read_text().splitlines()):
        row = json.loads(line)
        conversation = [{"role": "human", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        rows.append({"id": index, "status": "OK", "conversation": conversation})
    return rows


@pytest.fixture
def repo_copy(tmp_path, gsm8k_files, monkeypatch):
    """A repository root with the four default data files in the original format, set as $CAFT_REPO_ROOT."""
    root = tmp_path / "repo"
    datasets = root / "scripts" / "datasets"
    datasets.mkdir(parents=True)
    train, held_out = gsm8k_files
    for name, source in (("train_set", train), ("eval_set", held_out), ("aux_head_train", train), ("aux_head_eval", held_out)):
        (datasets / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _original_rows(source)))
    monkeypatch.setenv("CAFT_REPO_ROOT", str(root))
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # the default data is found relative to the repository, not the working directory
    return root


def run_script_in_process(script: str, argv: list[str], monkeypatch, capfd) -> tuple[int, str, str]:
    """Execute scripts/<script> as __main__ with argv; return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(REPO / "scripts" / script), *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "scripts" / script), run_name="__main__")
    captured = capfd.readouterr()
    return exit_info.value.code, captured.out, captured.err


def equivalent_caft_arguments(stderr: str, script_name: str) -> list[str]:
    """The `caft ...` arguments that the script logged as the command it runs."""
    prefix = f"{script_name}: running `caft "
    line = next(line for line in stderr.splitlines() if line.startswith(prefix))
    return shlex.split(line[len(prefix) : -1])


def _load_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def _replace_output_dir(arguments: list[str], output_dir: Path) -> list[str]:
    index = arguments.index("--output-dir")
    return [*arguments[: index + 1], str(output_dir), *arguments[index + 2 :]]


# Help and missing data ----------------------------------------------------------------------------


def test_train_help_shows_original_defaults():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--help"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    assert "usage: scripts/train.py" in help_text
    assert f"(default: {ORIGINAL_MODEL})" in help_text
    assert "(default: 1e-05)" in help_text
    for flag in ("-ftm", "-hpretrain", "-fr-unembed", "-ft-heads", "-hdir"):
        assert flag in help_text, flag
    assert "scripts/datasets/train_set.jsonl" in help_text


def test_heads_help_shows_original_defaults(monkeypatch, capfd):
    code, out, _err = run_script_in_process("train_aux_heads.py", ["--help"], monkeypatch, capfd)
    assert code == 0
    help_text = " ".join(out.split())
    assert "usage: scripts/train_aux_heads.py" in help_text
    assert "(default: 4096)" in help_text
    assert "scripts/datasets/aux_head_train.jsonl" in help_text


@pytest.mark.parametrize(
    ("script", "missing"),
    [("train.py", "scripts/datasets/train_set.jsonl"), ("train_aux_heads.py", "scripts/datasets/aux_head_train.jsonl")],
)
def test_missing_default_data_names_file(script, missing, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("CAFT_REPO_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code, _out, err = run_script_in_process(script, [], monkeypatch, capfd)
    assert code == 2
    assert missing in err
    assert str(tmp_path / missing) in err
    # The message shows one valid line of the original format: caft reads it back as a conversation.
    example = next(line.strip() for line in err.splitlines() if line.strip().startswith("{"))
    (tmp_path / "example.jsonl").write_text(example + "\n")
    conversations, stats = read_conversations(tmp_path / "example.jsonl")
    assert stats.rows_kept == 1
    assert [message["role"] for message in conversations[0]] == ["user", "assistant"]
    assert '"status": "OK"' in example


def test_missing_eval_file_is_reported(repo_copy, monkeypatch, capfd):
    (repo_copy / "scripts" / "datasets" / "eval_set.jsonl").unlink()
    code, _out, err = run_script_in_process("train.py", ["-ftm", "lora"], monkeypatch, capfd)
    assert code == 2
    assert "scripts/datasets/eval_set.jsonl" in err
    assert "--eval-set FILE" in err


# README commands reach `caft train` ---------------------------------------------------------------


@pytest.mark.parametrize("readme_flags", README_COMMANDS, ids=[" ".join(flags) for flags in README_COMMANDS])
def test_readme_command_equals_caft_train(readme_flags, repo_copy, tiny_model_dir, monkeypatch, capfd):
    argv = ["-model", str(tiny_model_dir), *TINY_RUN, *readme_flags]
    code, _out, err = run_script_in_process("train.py", argv, monkeypatch, capfd)
    assert code == 0, err
    arguments = equivalent_caft_arguments(err, "scripts/train.py")
    script_run = Path(arguments[arguments.index("--output-dir") + 1])
    assert script_run.parent == Path("outputs")
    assert (script_run / "config.yaml").is_file()

    # The same arguments through the `caft` command give the same resolved configuration.
    caft_run = Path("caft-run")
    assert cli.main(_replace_output_dir(arguments, caft_run)) == 0
    script_config, caft_config = _load_config(script_run), _load_config(caft_run)
    assert script_config.pop("output_dir") != caft_config.pop("output_dir")
    assert script_config == caft_config

    # Original defaults where the command gives no value; the command's own flags win.
    assert script_config["train_set"] == str(repo_copy / "scripts" / "datasets" / "train_set.jsonl")
    assert script_config["eval_set"] == str(repo_copy / "scripts" / "datasets" / "eval_set.jsonl")
    assert script_config["learning_rate"] == (5e-6 if "-lr" in readme_flags else 1e-5)
    assert script_config["warmup_steps"] == 50
    assert script_config["epochs"] == 5
    assert script_config["gradient_accumulation_steps"] == 4
    assert script_config["lora_dropout"] == 0.1
    assert script_config["early_stopping_patience"] == 2
    assert script_config["model_max_length"] == 160
    assert script_config["finetune_method"] == readme_flags[1]
    assert script_config["heads_pretraining"] == ("-hpretrain" in readme_flags)
    if "-hpretrain" in readme_flags:
        assert (script_run / "heads_pretrained" / "model.safetensors").is_file()


def test_config_file_values_beat_original_defaults(repo_copy, tiny_model_dir, monkeypatch, capfd):
    (repo_copy / "run.yaml").write_text("learning_rate: 0.002\nwarmup_steps: 0\n")
    argv = ["--config", str(repo_copy / "run.yaml"), "-model", str(tiny_model_dir), *TINY_RUN, "-ftm", "lora"]
    code, _out, err = run_script_in_process("train.py", argv, monkeypatch, capfd)
    assert code == 0, err
    arguments = equivalent_caft_arguments(err, "scripts/train.py")
    assert "--learning-rate" not in arguments
    assert "--warmup-steps" not in arguments
    config = _load_config(Path(arguments[arguments.index("--output-dir") + 1]))
    assert config["learning_rate"] == 0.002
    assert config["warmup_steps"] == 0
    assert config["epochs"] == 5


# torchrun, tokens and trackers --------------------------------------------------------------------


def _torchrun(script: str, argv: list[str], cwd: Path, root: Path) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun is not None, "torchrun not found beside the Python interpreter"
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGINGFACE_TOKEN", "WANDB_TOKEN", "WANDB_API_KEY")}
    env.update(CAFT_REPO_ROOT=str(root), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    # Where wandb is installed, a WANDB_TOKEN turns it on: keep it offline so no server is contacted.
    env.update(WANDB_MODE="offline", WANDB_DIR=str(cwd))
    command = [torchrun, "--nproc-per-node", "1", "--master-port", str(_free_port()), str(REPO / "scripts" / script), *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_train_hides_tokens(repo_copy, tiny_model_dir):
    # wandb checks the key's length (40 or more characters) before anything else.
    hub_token, wandb_token, flag_token = "hf_fakeTokenFromDotEnv123", "wandbFakeToken" + "0" * 30, "hf_fakeTokenFromFlag789"
    workdir = repo_copy.parent / "torchrun-workdir"
    workdir.mkdir()
    (workdir / ".env").write_text(f"HUGGINGFACE_TOKEN={hub_token}\nWANDB_TOKEN={wandb_token}\n")
    argv = ["-model", tiny_model_dir, *TINY_RUN, "-ftm", "lora", "-t", flag_token]
    result = _torchrun("train.py", argv, workdir, repo_copy)
    assert result.returncode == 0, result.stderr[-3000:]

    runs = list((workdir / "outputs").iterdir())
    assert len(runs) == 1
    assert (runs[0] / "adapter_model.safetensors").is_file()
    output = result.stdout + result.stderr
    files = [path for path in runs[0].rglob("*") if path.is_file()]
    assert len(files) > 5
    files += [path for path in (workdir / "wandb").rglob("*") if path.is_file()]
    for token in (hub_token, wandb_token, flag_token):
        assert token not in output
        for path in files:
            assert token.encode() not in path.read_bytes(), path
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert "WANDB_TOKEN is set but the wandb package is not installed" in result.stderr
        assert _load_config(runs[0])["report_to"] == "none"
    else:
        assert _load_config(runs[0])["report_to"] == "wandb"
        assert (workdir / "wandb").is_dir()


def test_torchrun_heads_script_runs_train_heads(repo_copy, tiny_model_dir):
    argv = ["-model", tiny_model_dir, "-maxlen", "160", "-micro-bs", "2", "-e", "1", "-esz", "4", "--logging-steps", "1"]
    result = _torchrun("train_aux_heads.py", argv, repo_copy, repo_copy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running `caft train-heads " in result.stderr
    (run,) = list((repo_copy / "output_heads").iterdir())
    config = _load_config(run)
    assert config["train_set"] == str(repo_copy / "scripts" / "datasets" / "aux_head_train.jsonl")
    assert config["learning_rate"] == 1e-4
    assert config["warmup_steps"] == 300
    assert config["gradient_accumulation_steps"] == 2
    heads_config = json.loads((run / "heads" / "config.json").read_text())
    assert heads_config["num_heads"] == 4


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_report_to_missing_tracker_exits_2(tracker, tiny_model_dir, gsm8k_files, tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, tracker, None)  # the import system's marker for a module that is not installed
    train, _ = gsm8k_files
    code = cli.main(["train", "-model", str(tiny_model_dir), "-ts", str(train), "--prompt-field", "question",
                     "--response-field", "answer", "--report-to", tracker, "--output-dir", str(tmp_path / "run")])
    assert code == 2
    err = capfd.readouterr().err
    assert f"--report-to {tracker} needs the {tracker} package" in err
    assert f"pip install {tracker}" in err
    assert not (tmp_path / "run").exists()


def test_wandb_token_without_package_warns(repo_copy, tiny_model_dir, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("WANDB_TOKEN", "wandbFakeToken" + "0" * 30)
    monkeypatch.setenv("WANDB_API_KEY", "wandbFakeToken" + "0" * 30)  # restored after the test, unlike .env loading
    code, out, err = run_script_in_process("train.py", ["-model", tiny_model_dir, *TINY_RUN, "-ftm", "lora"], monkeypatch, capfd)
    assert code == 0, err
    assert "WANDB_TOKEN is set but the wandb package is not installed" in err
    arguments = equivalent_caft_arguments(err, "scripts/train.py")
    assert "--report-to" not in arguments
    assert _load_config(Path(arguments[arguments.index("--output-dir") + 1]))["report_to"] == "none"
    assert "wandbFakeToken" not in out + err


# Published heads ----------------------------------------------------------------------------------


def _fake_hub_cache(cache: Path, state: dict) -> None:
    """Store `state` as the published repo's heads.pth in a hub cache layout, as a download would leave it."""
    commit = "0" * 40
    repo_folder = cache / ("models--" + PUBLISHED_REPO.replace("/", "--"))
    (repo_folder / "refs").mkdir(parents=True)
    (repo_folder / "refs" / "main").write_text(commit)
    snapshot = repo_folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.save(state, snapshot / "heads.pth")


def test_llama_default_uses_published_heads(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from caft.heads import HeadsConfig, build_heads, merged_state_dict
    from caft.train import setup_heads
    from conftest import tiny_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = tiny_model("llama", seed=1)
    published = merged_state_dict(build_heads(source, HeadsConfig(num_heads=4, wiring="reference")))
    _fake_hub_cache(tmp_path / "hub", published)

    model = tiny_model("llama", seed=2)
    setup_heads(model, TrainConfig(model_name_or_path=ORIGINAL_MODEL), published_default=True)
    assert model.caft_heads.config.wiring == PUBLISHED_HEADS_WIRING
    loaded = merged_state_dict(model.caft_heads)
    assert loaded.keys() == published.keys()
    for key, tensor in published.items():
        assert torch.equal(loaded[key], tensor), key

    # `caft train-heads` starts from copies of the last layer, as the original heads script did.
    fresh = tiny_model("llama", seed=2)
    setup_heads(fresh, TrainConfig(model_name_or_path=ORIGINAL_MODEL, heads_pretraining=True))
    fresh_state = merged_state_dict(fresh.caft_heads)
    assert not all(torch.equal(fresh_state[key], published[key]) for key in published)


def test_other_model_starts_from_copies(tmp_path, monkeypatch, caplog):
    from caft.train import setup_heads
    from conftest import tiny_model

    model = tiny_model("llama")
    with caplog.at_level("WARNING", logger="caft.train"):
        setup_heads(model, TrainConfig(model_name_or_path=str(tmp_path / "my-model")), published_default=True)
    assert len(model.caft_heads) == 4
    assert model.caft_heads.config.wiring == "sibling"
    assert "-hpretrain or `caft train-heads`" in caplog.text


def test_offline_published_heads_exit_2(tiny_model_dir, gsm8k_files, tmp_path, monkeypatch, capfd):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    train, _ = gsm8k_files
    code = cli.main(["train", "-model", str(tiny_model_dir), "-ts", str(train), "--prompt-field", "question",
                     "--response-field", "answer", "-hdir", PUBLISHED_REPO, "--output-dir", str(tmp_path / "run")])
    assert code == 2
    err = capfd.readouterr().err
    assert PUBLISHED_REPO in err
    assert "-hdir" in err


class _ClosingServer:
    """A loopback TCP server that counts connections and closes each one without answering."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self):
        self.socket.close()


def test_unreachable_hub_fails_after_one_request(tmp_path, monkeypatch):
    from huggingface_hub import constants

    server = _ClosingServer()
    try:
        endpoint = f"http://127.0.0.1:{server.port}"
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        with pytest.raises(FileNotFoundError) as error:
            check_hub_reachable(PUBLISHED_REPO, timeout_s=5)
    finally:
        server.close()
    assert PUBLISHED_REPO in str(error.value)
    assert "-hdir" in str(error.value)
    assert server.connections == 1  # no retry loop
