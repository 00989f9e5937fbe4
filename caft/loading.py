"""Load base models and tokenizers: hub ids, local folders, GGUF files and the embedded default.

Credentials come from the environment or a `.env` file in the working directory
(`HUGGINGFACE_TOKEN`, `WANDB_TOKEN`) and are never printed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .assets import resolve_model_name

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_environment() -> None:
    """Read `.env` from the working directory and expose HUGGINGFACE_TOKEN as HF_TOKEN for huggingface_hub."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # python-dotenv is a dependency; this only guards broken installs.
        logger.warning("python-dotenv is not installed; a .env file will not be read.")
    else:
        load_dotenv(Path.cwd() / ".env", override=False)
    token = os.environ.get("HUGGINGFACE_TOKEN")
    if token and not os.environ.get("HF_TOKEN"):
        os.environ["HF_TOKEN"] = token
    if os.environ.get("WANDB_TOKEN") and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_API_KEY"] = os.environ["WANDB_TOKEN"]


# A local folder must contain one of these files before from_pretrained gets it. transformers
# loads an adapter folder (adapter_config.json) on top of its base model, but AutoTokenizer does
# not, so a tokenizer needs a model config or tokenizer files.
MODEL_FOLDER_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FOLDER_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json")


def looks_like_local_path(name: str) -> bool:
    """Tell whether `name` is meant as a local path rather than a hub id.

    True when it starts with `/`, `.` or `~`, ends with `/`, names an existing file or folder, or
    contains a path separator and its parent folder exists (`org/model` is a hub id unless `org/`
    exists here).
    """
    if name.startswith(("/", ".", "~")) or name.endswith("/"):
        return True
    path = Path(name)
    if path.exists():
        return True
    return os.sep in name and path.parent.exists()


def check_model_path(name: str, folder_files: tuple[str, ...] = MODEL_FOLDER_FILES) -> None:
    """Raise FileNotFoundError or ValueError, naming `name`, when it is a local path but not a model.

    A model is a folder containing one of `folder_files` or a `.gguf` file. Hub ids pass unchecked,
    and from_pretrained reports their errors. Without this check, transformers treats a mistyped
    path as a hub id ("Repo id must be in the form ...") or fails later with an unrelated message.
    """
    if not looks_like_local_path(name):
        return
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name} not found. Check the path.")
        return
    if not path.exists():
        raise FileNotFoundError(
            f"The model path {name} does not exist. Check the path, or pass a hub id or 'smollm2' for the embedded model."
        )
    if not path.is_dir():
        raise ValueError(
            f"{name} is a file, not a model folder. Pass a model folder (config.json and weights), "
            "a .gguf file, a caft run folder or a hub id."
        )
    if not any((path / file_name).is_file() for file_name in folder_files):
        raise FileNotFoundError(
            f"{name} has no config.json. Pass a model folder (config.json and weights), a caft run folder or a hub id."
        )


def _local_location(name_or_path, folder_files: tuple[str, ...]) -> str:
    """Map an alias to its folder, check a local path, and expand a leading `~`."""
    name = resolve_model_name(str(name_or_path))
    check_model_path(name, folder_files)
    return os.path.expanduser(name) if name.startswith("~") else name


def invalid_weights_error(location: str | Path, error: Exception) -> ValueError:
    """Build the error for safetensors weights that are truncated or corrupt.

    `location` is the weights file, or a model folder, whose file is named when it has only one.
    """
    path = Path(location)
    if path.is_file():
        where = str(path)
    else:
        weights = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        where = str(weights[0]) if len(weights) == 1 else f"A .safetensors file of the model {location}"
    return ValueError(
        f"{where} is not a valid safetensors file (truncated or corrupt): {error}. "
        "Restore it, or write it again (train, download or export)."
    )


def _split_gguf(name: str) -> tuple[str, dict]:
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found.")
        return str(path.parent), {"gguf_file": path.name}
    return name, {}


def load_tokenizer(name_or_path: str):
    """Load a tokenizer and make sure it has a pad token (the end-of-sequence token when it has none)."""
    from transformers import AutoTokenizer

    location, extra = _split_gguf(_local_location(name_or_path, TOKENIZER_FOLDER_FILES))
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token; using the end-of-sequence token %r for padding.", tokenizer.eos_token)
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(name_or_path: str, dtype: str = "float32", load_in_8bit: bool = False, load_in_4bit: bool = False):
    """Load a causal LM from a hub id, a local folder or a `.gguf` file (dequantized by transformers)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    location, extra = _split_gguf(_local_location(name_or_path, MODEL_FOLDER_FILES))
    if load_in_8bit or load_in_4bit:
        if not torch.cuda.is_available():
            raise ValueError(
                "--load-in-8bit/--load-in-4bit need a CUDA GPU and the bitsandbytes package; this machine has no GPU. "
                "Drop the flag to train in full precision."
            )
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype], **extra)
    except SafetensorError as error:
        raise invalid_weights_error(location, error) from error
    except OSError as error:
        raise OSError(
            f"Could not load the model {name_or_path!r}: {error}. Pass a local folder or .gguf file, "
            "or 'smollm2' for the embedded model, when the hub is unreachable."
        ) from error
    if extra.get("gguf_file"):
        # A GGUF-loaded model keeps a quantization_config that save_pretrained rejects; it is float32 now.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
    return model


BASE_MODEL_HINT = "Pass the base model the adapter was trained on with --base-model."


def load_adapter_model(run_dir: str | Path, base_model: str | None = None, dtype: str = "float32",
                       base_hint: str = BASE_MODEL_HINT):
    """Load a PEFT adapter folder onto its base model; return (PeftModel, base model name).

    The base is `base_model` or the adapter_config.json's base_model_name_or_path. Errors name the
    file or folder at fault: an unreadable config, a base that is missing or of another shape, and
    truncated adapter weights.
    """
    run_dir = Path(run_dir)
    adapter_config = run_dir / "adapter_config.json"
    base_name = base_model or _configured_base_model(adapter_config)
    base = _load_base_model(base_name, adapter_config if base_model is None else None, dtype, base_hint)
    return _load_adapter(base, run_dir, base_name, base_hint), base_name


def _configured_base_model(adapter_config: Path) -> str:
    """Read base_model_name_or_path from an adapter_config.json, and raise ValueError naming the file when it is unreadable."""
    try:
        data = json.loads(adapter_config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{adapter_config}: invalid JSON ({error}). Restore the adapter_config.json that `caft train` wrote."
        ) from error
    base_name = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not isinstance(base_name, str) or not base_name:
        raise ValueError(f"{adapter_config} names no base_model_name_or_path. Pass the base model with --base-model.")
    return base_name


def _load_base_model(base_name: str, adapter_config: Path | None, dtype: str, base_hint: str):
    """Load the base model. `adapter_config` is the file that named it, None when --base-model did."""
    if adapter_config is None:
        return load_model(base_name, dtype=dtype)
    if looks_like_local_path(base_name) and not Path(base_name).expanduser().exists():
        raise FileNotFoundError(
            f"The base model {base_name} named in {adapter_config} was not found. {base_hint}"
        )
    try:
        return load_model(base_name, dtype=dtype)
    except (OSError, ValueError) as error:
        message = f"Could not load the base model {base_name} named in {adapter_config}: {error} {base_hint}"
        raise (OSError(message) if isinstance(error, OSError) else ValueError(message)) from error


def _load_adapter(base, run_dir: Path, base_name: str, base_hint: str):
    """Load the adapter in `run_dir` onto `base`, and raise ValueError naming the folders when it is corrupt or does not fit."""
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        return PeftModel.from_pretrained(base, str(run_dir))
    except SafetensorError as error:
        raise invalid_weights_error(run_dir / "adapter_model.safetensors", error) from error
    except RuntimeError as error:
        # torch's load_state_dict reports tensors of another shape as "size mismatch for <name>: ...".
        if "size mismatch" not in str(error):
            raise
        first = next((line.strip().rstrip(".") for line in str(error).splitlines() if "size mismatch" in line), "")
        raise ValueError(
            f"The adapter in {run_dir} does not fit the base model {base_name} ({first}). {base_hint}"
        ) from error
