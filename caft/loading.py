"""Load base models and tokenizers: hub ids, local folders, GGUF files and the embedded default.

Credentials come from the environment or a `.env` file in the working directory
(`HUGGINGFACE_TOKEN`, `WANDB_TOKEN`) and are never printed.
"""

from __future__ import annotations

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

    location, extra = _split_gguf(resolve_model_name(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token; using the end-of-sequence token %r for padding.", tokenizer.eos_token)
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(name_or_path: str, dtype: str = "float32", load_in_8bit: bool = False, load_in_4bit: bool = False):
    """Load a causal LM from a hub id, a local folder or a `.gguf` file (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM

    location, extra = _split_gguf(resolve_model_name(name_or_path))
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
