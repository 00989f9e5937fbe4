"""The original CAFT scripts (`scripts/train.py`, `scripts/train_aux_heads.py`) on top of `caft`.

The original repository's README runs:

    torchrun --nproc-per-node 1 scripts/train.py -ftm lora
    torchrun --nproc-per-node 1 scripts/train.py -ftm lora -ft-heads -hpretrain
    torchrun --nproc-per-node 1 scripts/train.py -ftm sft -lr 5e-6 -fr-unembed
    torchrun --nproc-per-node 1 scripts/train.py -ftm sft -lr 5e-6 -fr-unembed -ft-heads -hpretrain
    torchrun --nproc-per-node 4 scripts/train_aux_heads.py

Each script parses the `caft train` flags and adds the original script's default for every
setting that the command line and --config leave unset. It then logs the equivalent `caft`
command and runs it through `caft.cli.main`, so there is no second training implementation.

Differences from the original scripts, on purpose:
- Without --output-dir, runs go to a new folder under `outputs/` (`output_heads/` for heads)
  instead of overwriting `./outputs` (`./output_heads`).
- Reporting: when --report-to is not given, wandb is used if WANDB_TOKEN is set (in the
  environment or `.env`) and the wandb package is installed, as the original did; without the
  package a warning is printed and the run goes on without reporting.
- The 8-bit AdamW optimizer and bfloat16 weights of the original are used only with a CUDA GPU
  (bitsandbytes needs one, and bfloat16 training on CPUs is slow); elsewhere caft's defaults
  (adamw_torch, float32) apply.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ORIGINAL_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
# Heads published by the CAFT authors, per base model. They were trained with the original code's
# wiring, which caft reproduces as `--head-wiring reference`.
PUBLISHED_HEADS = {ORIGINAL_MODEL: "michaelchenkj/Llama-3.1-8B-Instruct-Aux-Heads"}
PUBLISHED_HEADS_WIRING = "reference"
# The original heads data set, on the hub.
HEADS_DATASET = "michaelchenkj/CAFT-Auxiliary-Head-Dataset"
REPO_ROOT_ENV = "CAFT_REPO_ROOT"
EXIT_INPUT_ERROR = 2

EXAMPLE_ROW = {
    "id": 1,
    "status": "OK",
    "conversation": [
        {"role": "human", "content": "What is 7 * 6?"},
        {"role": "assistant", "content": "7 * 6 = 42."},
    ],
}


def published_heads_repo(model_name_or_path: str) -> str | None:
    """Return the hub repo of the heads the CAFT authors published for this base model, or None."""
    return PUBLISHED_HEADS.get(model_name_or_path)


def is_published_heads(source: str) -> bool:
    """Check whether a heads source (an -hdir value) is one of the published hub repos."""
    return source in PUBLISHED_HEADS.values()


def check_hub_reachable(repo_id: str, timeout_s: float = 10.0) -> None:
    """Raise FileNotFoundError at once when the hub cannot serve `repo_id`'s heads, naming -hdir as the fix.

    huggingface_hub 2.4 retries a failed download with backoff and 60 s timeouts, for two file
    names. That took 62 s with the connection refused (2 CPU cores), and takes longer when
    packets are dropped. This check sends one metadata request without retries instead. It sends nothing when
    HF_HUB_OFFLINE is set (downloads then fail at once) or when the heads are in the local cache.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    if constants.HF_HUB_OFFLINE or Path(repo_id).exists():
        return  # a local folder of that name is read from disk
    if any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in ("model.safetensors", "heads.pth")):
        return
    try:
        import httpx2 as http_client  # the HTTP client of huggingface_hub 2.x
    except ImportError:
        import httpx as http_client
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "heads.pth"), timeout=timeout_s, retry_on_errors=False)
    except (EntryNotFoundError, HfHubHTTPError):
        return  # the hub responded, so the download itself reports a missing file or access problem
    except (OSError, http_client.HTTPError) as error:
        raise FileNotFoundError(
            f"Could not reach the hub at {constants.ENDPOINT} to download the auxiliary heads {repo_id} "
            f"({type(error).__name__}: {error}). Without network access, pass a local heads folder or heads.pth "
            "with -hdir/--auxiliary-heads-dir (`caft train-heads` trains one)."
        ) from error


@dataclass(frozen=True)
class ScriptSpec:
    """One original script: its caft command, its original defaults and its default data files."""

    name: str
    command: str
    # Original defaults as caft flags: (config field, flag, value); a list value is several arguments.
    defaults: tuple[tuple[str, str, object], ...]
    train_file: str
    eval_file: str
    output_parent: str


TRAIN_SCRIPT = ScriptSpec(
    name="scripts/train.py",
    command="train",
    defaults=(
        ("model_name_or_path", "--model-name-or-path", ORIGINAL_MODEL),
        ("model_max_length", "--model-max-length", 512),
        ("size", "--size", 10_000),
        ("learning_rate", "--learning-rate", 1e-5),
        ("warmup_steps", "--warmup-steps", 50),
        ("epochs", "--epochs", 5),
        ("per_device_batch_size", "--per-device-batch-size", 8),
        ("gradient_accumulation_steps", "--gradient-accumulation-steps", 4),
        ("lora_dropout", "--lora-dropout", 0.1),
        ("lora_target_modules", "--lora-target-modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("early_stopping_patience", "--early-stopping-patience", 2),
    ),
    train_file="scripts/datasets/train_set.jsonl",
    eval_file="scripts/datasets/eval_set.jsonl",
    output_parent="outputs",
)

HEADS_SCRIPT = ScriptSpec(
    name="scripts/train_aux_heads.py",
    command="train-heads",
    defaults=(
        ("model_name_or_path", "--model-name-or-path", ORIGINAL_MODEL),
        ("model_max_length", "--model-max-length", 4096),
        ("learning_rate", "--learning-rate", 1e-4),
        ("warmup_steps", "--warmup-steps", 300),
        ("epochs", "--epochs", 5),
        ("per_device_batch_size", "--per-device-batch-size", 8),
        ("gradient_accumulation_steps", "--gradient-accumulation-steps", 2),
        ("early_stopping_patience", "--early-stopping-patience", 3),
    ),
    train_file="scripts/datasets/aux_head_train.jsonl",
    eval_file="scripts/datasets/aux_head_eval.jsonl",
    output_parent="output_heads",
)


class ScriptInputError(Exception):
    """A problem with the script's input that ends the run with exit code 2 and one message."""


def repo_root(script_file: str | Path) -> Path:
    """Return the repository root: $CAFT_REPO_ROOT when set, else the folder above `scripts/`."""
    if os.environ.get(REPO_ROOT_ENV):
        return Path(os.environ[REPO_ROOT_ENV]).resolve()
    return Path(script_file).resolve().parents[1]


def build_script_parser(spec: ScriptSpec) -> argparse.ArgumentParser:
    """Build the parser of the `caft train` flags, with help texts that show this script's defaults."""
    from .config import add_config_arguments

    overrides = {dest: value for dest, _flag, value in spec.defaults}
    parser = argparse.ArgumentParser(
        prog=spec.name,
        description=f"The original CAFT script, run as `caft {spec.command}` with the original defaults. "
        f"Default data: {spec.train_file} and {spec.eval_file} in the repository root; "
        f"runs go to a new folder under {spec.output_parent}/.",
        epilog="HUGGINGFACE_TOKEN and WANDB_TOKEN are read from the environment or a .env file in the working "
        "directory; with WANDB_TOKEN set and no --report-to, the run reports to wandb.",
    )
    parser.add_argument("--verbose", action="store_true", help="Log INFO messages on every process; show tracebacks.")
    parser.add_argument(
        "--api-token", "-t", default=argparse.SUPPRESS,
        help="Hugging Face token (default: HUGGINGFACE_TOKEN from the environment or .env). It is never printed or "
        "saved, but other users of this machine can see command lines: prefer .env.",
    )
    add_config_arguments(parser)
    for action in parser._actions:
        if action.dest in overrides:
            value = overrides[action.dest]
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            action.help = re.sub(r"\(default: [^)]*\)\.?$", "", action.help or "").rstrip(" .") + f" (default: {shown})."
    return parser


def resolve_arguments(spec: ScriptSpec, argv: list[str], root: Path) -> tuple[list[str], list[str]]:
    """Parse the script's command line and return (arguments added from the original defaults, user arguments).

    Raises ScriptInputError for a missing default data file.
    """
    parser = build_script_parser(spec)
    args = parser.parse_args(argv)
    given = {name for name in vars(args) if name not in ("verbose", "config", "api_token")}
    if getattr(args, "config", None):
        given |= _config_file_keys(Path(args.config))

    added: list[str] = []
    for dest, flag, value in spec.defaults:
        if dest not in given:
            added += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    model = getattr(args, "model_name_or_path", None) if "model_name_or_path" in given else ORIGINAL_MODEL
    for dest, flag, relative in (("train_set", "--train-set", spec.train_file), ("eval_set", "--eval-set", spec.eval_file)):
        if dest not in given:
            path = root / relative
            if not path.is_file():
                raise ScriptInputError(missing_data_message(spec, relative, path, flag))
            added += [flag, str(path)]
    if "output_dir" not in given:
        added += ["--output-dir", default_output_dir(spec, model, args)]
    added += _gpu_defaults(given)
    added += _report_to_default(given)
    user_arguments = _without_token(argv)
    return added, user_arguments


def missing_data_message(spec: ScriptSpec, relative: str, path: Path, flag: str) -> str:
    """Explain which default data file to create, with one valid line of the original format."""
    text = (
        f"the default data file {relative} was not found ({path}). Create it with one JSON object "
        f"per line in the original CAFT format, for example:\n  {json.dumps(EXAMPLE_ROW)}\n"
        f"or pass {flag} FILE (.jsonl or .json; OpenAI messages, ShareGPT and prompt/completion rows work too)."
    )
    if spec is HEADS_SCRIPT:
        text += f"\nThe original heads data is the hub data set {HEADS_DATASET}; `caft distill` can build such data from your prompts."
    return text


def default_output_dir(spec: ScriptSpec, model: str, args: argparse.Namespace) -> str:
    """Return a new run folder under the original output folder, the same on every process of one torchrun."""
    model_name = Path(str(model).rstrip("/")).name or "model"
    kind = model_name if spec is HEADS_SCRIPT else f"{model_name}-{getattr(args, 'mode', 'caft')}-{getattr(args, 'finetune_method', 'lora')}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every local process of one torchrun is a child of the same torchrun agent, so its pid names the launch.
        # NOTE: processes on other nodes have other agents, so multi-node runs need an explicit --output-dir.
        return str(Path(spec.output_parent) / f"{kind}-torchrun{os.getppid()}")
    return str(Path(spec.output_parent) / f"{kind}-{datetime.now():%Y%m%d-%H%M%S}")


def _config_file_keys(path: Path) -> set[str]:
    import yaml

    if not path.is_file():
        return set()  # caft reports the missing file with its own message
    loaded = yaml.safe_load(path.read_text()) or {}
    return set(loaded) if isinstance(loaded, dict) else set()


def _gpu_defaults(given: set[str]) -> list[str]:
    """Return the original's bfloat16 weights and 8-bit AdamW flags where a CUDA GPU (and bitsandbytes) support them."""
    import torch

    if not torch.cuda.is_available():
        return []
    added = [] if "dtype" in given else ["--dtype", "bfloat16"]
    if "optimizer" not in given and importlib.util.find_spec("bitsandbytes") is not None:
        added += ["--optimizer", "adamw_bnb_8bit"]
    return added


def _report_to_default(given: set[str]) -> list[str]:
    """Report to wandb when a WANDB_TOKEN is set and --report-to is not given, as the original did."""
    if "report_to" in given or not os.environ.get("WANDB_TOKEN"):
        return []
    if importlib.util.find_spec("wandb") is None:
        print(
            "warning: WANDB_TOKEN is set but the wandb package is not installed, so this run reports to no tracker. "
            "Install it with `pip install wandb`, or pass --report-to none to silence this warning.",
            file=sys.stderr,
        )
        return []
    return ["--report-to", "wandb"]


def _without_token(argv: list[str]) -> list[str]:
    """Drop --api-token/-t and its value: the token goes to the environment, never into a command line."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
            continue
        if argument in ("--api-token", "-t"):
            skip = True
            continue
        if argument.startswith("--api-token="):
            continue
        kept.append(argument)
    return kept


def _apply_token(argv: list[str]) -> None:
    """Put an --api-token value into HF_TOKEN, where huggingface_hub reads it."""
    for index, argument in enumerate(argv):
        if argument in ("--api-token", "-t") and index + 1 < len(argv):
            os.environ["HF_TOKEN"] = argv[index + 1]
        elif argument.startswith("--api-token="):
            os.environ["HF_TOKEN"] = argument.split("=", 1)[1]


def run_script(spec: ScriptSpec, script_file: str | Path, argv: list[str] | None = None) -> int:
    """Run an original script's command line as the equivalent `caft` command; return the exit code."""
    from . import cli
    from .loading import load_environment

    argv = list(sys.argv[1:] if argv is None else argv)
    load_environment()
    _apply_token(argv)
    # Trackers record sys.argv (wandb 0.31 stores it in the run's metadata), so the token must leave it.
    sys.argv = [sys.argv[0], *_without_token(argv)]
    try:
        added, user_arguments = resolve_arguments(spec, argv, repo_root(script_file))
    except ScriptInputError as error:
        print(f"{spec.name}: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    verbose = "--verbose" in user_arguments
    arguments = [spec.command, *added, *(argument for argument in user_arguments if argument != "--verbose")]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{spec.name}: running `caft {shlex.join(arguments)}`", file=sys.stderr, flush=True)
    return cli.main((["--verbose"] if verbose else []) + arguments)
