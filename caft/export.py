"""Export a fine-tuned model as a plain transformers folder: LoRA merged in full precision, heads left out.

    caft export runs/my-run --out runs/my-run/export [--dtype bfloat16] [--push-to-hub user/model]

The result loads with `AutoModelForCausalLM.from_pretrained` with no missing or unexpected keys and
needs no caft code. The auxiliary heads, when the run has them, are written as their own heads
folder, `<out>/heads` (config.json + model.safetensors), which `caft train -hdir` reads.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from .paths import check_output_folder

logger = logging.getLogger(__name__)

HEADS_FOLDER = "heads"


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's state dict without auxiliary-head keys."""
    return {key: value for key, value in model.state_dict().items() if "caft_heads." not in key}


def merge_adapter_model(peft_model, tokenizer, out_dir: str | Path) -> Path:
    """Merge the LoRA adapters of a trained PeftModel in place and save the result without heads.

    The merge runs in the model's own dtype; `caft export` reloads the base in float32 instead.
    The PeftModel is unusable for further training afterwards, so call this at the end of a run.
    Raises ValueError for a quantized base, whose merge would round the adapter into 4/8-bit weights.
    """
    base = peft_model.get_base_model()
    if getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None) is not None:
        raise ValueError(
            "Cannot merge LoRA into a quantized (4/8-bit) model without changing it. Export the run instead: "
            "`caft export RUN --out DIR` reloads the base model in float32 and merges there."
        )
    _untie_adapted_embeddings(peft_model)
    merged = peft_model.merge_and_unload()
    out_dir = Path(out_dir)
    _save_plain(merged, out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    logger.info("Merged model written to %s", out_dir)
    return out_dir


def export_model(
    run_dir: str | Path,
    out_dir: str | Path,
    base_model: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Load an adapter (or full model) folder, merge any adapter into its base in float32, and save it plainly.

    `dtype` is the dtype of the saved weights; the merge itself always runs in float32. A run
    folder, a `checkpoint-<step>` folder or any PEFT adapter folder works. The heads, when the
    folder has a `heads/` folder, are copied to `<out_dir>/heads`.
    """
    from transformers import AutoModelForCausalLM

    from .loading import DTYPES, invalid_weights_error, load_adapter_model, load_tokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"The run folder {run_dir} does not exist. Pass a caft run folder, checkpoint folder or adapter folder.")
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a run folder. Pass a caft run folder, checkpoint folder or adapter folder.")
    _check_out_dir(out_dir)
    if dtype not in DTYPES or dtype == "auto":
        raise ValueError(f"Invalid export dtype {dtype!r}; choose float32, bfloat16 or float16.")
    adapter_config = run_dir / "adapter_config.json"
    if adapter_config.is_file():
        from .assets import resolve_model_name

        peft_model, base_name = load_adapter_model(run_dir, base_model, dtype="float32")
        _untie_adapted_embeddings(peft_model)
        model = peft_model.merge_and_unload()
        tokenizer_source = run_dir if (run_dir / "tokenizer_config.json").is_file() else resolve_model_name(base_name)
    elif (run_dir / "config.json").is_file():
        from safetensors import SafetensorError

        try:
            model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
        except SafetensorError as error:
            raise invalid_weights_error(run_dir, error) from error
        tokenizer_source = run_dir if (run_dir / "tokenizer_config.json").is_file() else None
    else:
        raise FileNotFoundError(f"{run_dir} contains neither adapter_config.json nor config.json: pass a caft run folder.")

    model.to(DTYPES[dtype])
    _save_plain(model, out_dir)
    if tokenizer_source is not None:
        load_tokenizer(str(tokenizer_source)).save_pretrained(out_dir)
    else:
        logger.warning("%s has no tokenizer files; the export has none either.", run_dir)
    if (run_dir / HEADS_FOLDER).is_dir():
        shutil.copytree(run_dir / HEADS_FOLDER, out_dir / HEADS_FOLDER)
    logger.info("Exported %s to %s (%s)", run_dir, out_dir, dtype)
    return out_dir


def _check_out_dir(out_dir: Path) -> None:
    """Raise when --out, or the nearest of its parents that exists, is a file, or when --out is a folder that is not empty."""
    check_output_folder(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"Export folder {out_dir} exists and is not empty; choose another --out.")


def _save_plain(model: nn.Module, out_dir: Path) -> None:
    """save_pretrained without head keys, with the KV cache switched back on for generation."""
    model.config.use_cache = True  # training turned it off; generation with the export needs it
    model.save_pretrained(out_dir, state_dict=plain_state_dict(model), safe_serialization=True)


def _untie_adapted_embeddings(peft_model) -> bool:
    """Give lm_head its own weight when tied embeddings carry LoRA; return whether it untied them.

    With tied embeddings, merging a LoRA of lm_head (or of the input embedding) would write the
    delta into the one shared matrix and change the other side too. The adapter model applies it
    to one side only, so the merged model must keep two matrices.
    """
    model = peft_model.get_base_model()
    output_embeddings, input_embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if output_embeddings is None:
        return False
    output_base = getattr(output_embeddings, "base_layer", output_embeddings)
    input_base = getattr(input_embeddings, "base_layer", input_embeddings)
    adapted = output_base is not output_embeddings or input_base is not input_embeddings
    if not adapted or output_base.weight is not input_base.weight:
        return False
    output_base.weight = nn.Parameter(input_base.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False
    logger.info("The adapter changes a tied embedding; the merged model gets a separate lm_head weight.")
    return True


# Hub upload -------------------------------------------------------------------------------------------


def _hub_api():
    """The Hugging Face Hub client (a function, so tests can put a local folder in its place)."""
    from huggingface_hub import HfApi

    return HfApi()


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, exclude: list[str] | None = None) -> None:
    """Create `repo_id` if needed and upload `folder` to it, leaving out paths matching `exclude`.

    The token comes from HF_TOKEN or HUGGINGFACE_TOKEN (see loading.load_environment).
    """
    api = _hub_api()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        ignore_patterns=exclude,
        commit_message="Upload model exported by caft",
    )
    logger.info("Uploaded %s to the hub repo %s", folder, repo_id)


def push_export(out_dir: str | Path, repo_id: str, heads_repo_id: str | None = None, private: bool = False) -> None:
    """Upload an export: the model (without the heads folder) to `repo_id`, the heads to `heads_repo_id`."""
    out_dir = Path(out_dir)
    has_heads = (out_dir / HEADS_FOLDER).is_dir()
    push_to_hub(out_dir, repo_id, private=private, exclude=[f"{HEADS_FOLDER}/*"] if has_heads else None)
    if heads_repo_id is not None:
        if not has_heads:
            raise FileNotFoundError(f"{out_dir} has no {HEADS_FOLDER}/ folder to upload to {heads_repo_id}.")
        push_to_hub(out_dir / HEADS_FOLDER, heads_repo_id, private=private)
    elif has_heads:
        logger.info("The heads in %s/ were not uploaded; pass --push-heads-to-hub REPO to upload them.", out_dir / HEADS_FOLDER)


# Command line -----------------------------------------------------------------------------------------


def add_export_arguments(parser) -> None:
    """The flags of `caft export`."""
    parser.add_argument("run_dir", help="A caft run folder or checkpoint folder (adapter or full model).")
    parser.add_argument("--out", required=True, help="Folder to write; must not exist or be empty.")
    parser.add_argument("--base-model", default=None, help="Base model of the adapter (default: from adapter_config.json).")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
        help="Dtype of the saved weights; the merge itself runs in float32 (default: float32).",
    )
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="Also upload the model (no heads) to this hub repo.")
    parser.add_argument("--push-heads-to-hub", metavar="REPO", default=None, help="Also upload the heads folder to this hub repo.")
    parser.add_argument("--private", action="store_true", help="Create the hub repos as private.")


def command_export(args) -> int:
    """Run `caft export` with parsed arguments."""
    if args.push_heads_to_hub and not args.push_to_hub:
        raise ValueError("--push-heads-to-hub needs --push-to-hub for the model as well.")
    out = export_model(args.run_dir, args.out, base_model=args.base_model, dtype=args.dtype)
    print(f"exported to {out}")
    if args.push_to_hub:
        push_export(out, args.push_to_hub, heads_repo_id=args.push_heads_to_hub, private=args.private)
        print(f"uploaded to {args.push_to_hub}" + (f" and {args.push_heads_to_hub}" if args.push_heads_to_hub else ""))
    return 0
