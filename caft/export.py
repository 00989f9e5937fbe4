"""Export a fine-tuned model as a plain transformers folder: LoRA merged in full precision, heads left out.

    caft export runs/my-run --out runs/my-run/merged

The result loads with `AutoModelForCausalLM.from_pretrained` with no missing or unexpected keys.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without auxiliary-head keys."""
    return {key: value for key, value in model.state_dict().items() if "caft_heads." not in key}


def merge_adapter_model(peft_model, tokenizer, out_dir: str | Path) -> Path:
    """Merge the LoRA adapters of a trained PeftModel in place and save the result without heads.

    The PeftModel is unusable for further training afterwards; call this at the end of a run.
    """
    merged = peft_model.merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir, state_dict=plain_state_dict(merged), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    logger.info("Merged model written to %s", out_dir)
    return out_dir


def export_model(run_dir: str | Path, out_dir: str | Path, base_model: str | None = None, dtype: str = "float32") -> Path:
    """Load an adapter (or full model) folder, merge any adapter into its base in full precision, and save it plainly.

    Heads, when the run folder has a `heads/` folder, are copied next to the model as `<out_dir>/heads`.
    """
    from transformers import AutoModelForCausalLM

    from .loading import DTYPES, load_tokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"Export folder {out_dir} exists and is not empty; choose another --out.")
    adapter_config = run_dir / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        from .assets import resolve_model_name

        base_name = base_model or json.loads(adapter_config.read_text())["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(resolve_model_name(base_name), dtype=DTYPES[dtype])
        model = PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload()
    elif (run_dir / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=DTYPES[dtype])
    else:
        raise FileNotFoundError(f"{run_dir} holds neither adapter_config.json nor config.json: pass a caft run folder.")
    model.save_pretrained(out_dir, state_dict=plain_state_dict(model), safe_serialization=True)
    tokenizer_source = run_dir if (run_dir / "tokenizer_config.json").is_file() else base_name
    load_tokenizer(str(tokenizer_source)).save_pretrained(out_dir)
    if (run_dir / "heads").is_dir():
        shutil.copytree(run_dir / "heads", out_dir / "heads")
    logger.info("Exported %s to %s", run_dir, out_dir)
    return out_dir
