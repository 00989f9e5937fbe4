"""Auxiliary heads: construction from a base model, their forward pass, and saving and loading.

Head k (k = 1..n) predicts token t+1+k from position t. Two architectures:
- `transformer` (default): `num_layers` new instances of the model's own decoder-layer class,
  initialised as copies of its last decoder layer.
- `linear`: a residual block x + SiLU(W x) with W zero-initialised.
Two wirings for the transformer head:
- `sibling`: the head's layers take exactly the inputs of the model's last decoder layer (hidden
  state, position embeddings, attention mask), then the model's final norm and unembedding (lm_head).
- `reference`: the wiring of the original CAFT code during fine-tuning: the head's layers take the
  model's final normalised hidden state and their output goes to lm_head without a norm.
The linear head takes the output of the last decoder layer (before the final norm).

A heads folder holds `config.json` and `model.safetensors` with keys like
`0.layers.0.self_attn.q_proj.weight` (the key layout of the original code's `heads.pth`).
"""

from __future__ import annotations

import copy
import json
import pickle
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

HEAD_ARCHS = ("transformer", "linear")
HEAD_WIRINGS = ("sibling", "reference")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class HeadsConfig:
    """Shape and wiring of a set of auxiliary heads, saved as the heads folder's config.json."""

    num_heads: int = 4
    """Number of auxiliary heads; head k predicts token t+1+k."""
    num_layers: int = 1
    """Decoder layers per transformer head."""
    arch: str = "transformer"
    """`transformer` or `linear`."""
    wiring: str = "sibling"
    """`sibling` or `reference` (see the module docstring)."""
    separate_unembed: bool = False
    """Whether each head has its own unembedding, initialised from lm_head."""
    base_model: str = ""
    """Name or path of the base model the heads were built for."""
    hidden_size: int = 0
    vocab_size: int = 0
    model_type: str = ""
    extra: dict = field(default_factory=dict)
    """Free-form provenance (data, steps, accuracies) written by the tools that train heads."""

    def __post_init__(self):
        if self.num_heads < 0:
            raise ValueError(f"num_heads must be >= 0, got {self.num_heads}.")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")
        if self.arch not in HEAD_ARCHS:
            raise ValueError(f"Unknown head arch {self.arch!r}; choose one of {', '.join(HEAD_ARCHS)}.")
        if self.wiring not in HEAD_WIRINGS:
            raise ValueError(f"Unknown head wiring {self.wiring!r}; choose one of {', '.join(HEAD_WIRINGS)}.")

    @classmethod
    def from_dict(cls, data: dict) -> "HeadsConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


class ResidualSiLU(nn.Module):
    """x + SiLU(W x), with W zero-initialised so a new head starts as the model's own next-token head."""

    def __init__(self, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype)
        nn.init.zeros_(self.proj.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + nn.functional.silu(self.proj(hidden))


class AuxiliaryHead(nn.Module):
    """One auxiliary head: its own layers and, with a separate unembedding, its own lm_head."""

    def __init__(self, layers: nn.ModuleList, lm_head: nn.Linear | None = None):
        super().__init__()
        self.layers = layers
        if lm_head is not None:
            self.lm_head = lm_head

    def forward_layers(self, hidden: torch.Tensor, layer_args: tuple, layer_kwargs: dict) -> torch.Tensor:
        for layer in self.layers:
            if isinstance(layer, ResidualSiLU):
                hidden = layer(hidden)
                continue
            output = layer(hidden, *layer_args, **layer_kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
        return hidden


class AuxiliaryHeads(nn.Module):
    """The n auxiliary heads of one model. `heads[k-1]` is head k."""

    def __init__(self, config: HeadsConfig, heads: list[AuxiliaryHead]):
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList(heads)

    def __len__(self) -> int:
        return len(self.heads)


# Model structure lookup -------------------------------------------------------------------------

_LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_norm", "norm_f")


def find_decoder(model: nn.Module) -> nn.Module:
    """Return the decoder stack (e.g. LlamaModel, GPT2Model) of a causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None) or getattr(model, "model", None)
    if decoder is None or decoder is model:
        raise ValueError(f"Cannot find the decoder stack of {type(model).__name__}.")
    return decoder


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the ModuleList of decoder layers."""
    decoder = find_decoder(model)
    for name in _LAYER_LIST_NAMES:
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(
        f"Cannot find the decoder layers of {type(decoder).__name__}: looked for attributes {_LAYER_LIST_NAMES}."
    )


def find_final_norm(model: nn.Module) -> nn.Module:
    """Return the norm applied after the last decoder layer."""
    decoder = find_decoder(model)
    for name in _FINAL_NORM_NAMES:
        norm = getattr(decoder, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise ValueError(f"Cannot find the final norm of {type(decoder).__name__}: looked for {_FINAL_NORM_NAMES}.")


def unembedding_weight(model: nn.Module) -> torch.Tensor:
    """Return the effective lm_head weight, read through a LoRA wrapper (base weight plus the adapter's delta)."""
    lm_head = model.get_output_embeddings()
    base = getattr(lm_head, "base_layer", None)
    if base is None:
        return lm_head.weight.detach().clone()
    weight = base.weight.detach().clone()
    for adapter in getattr(lm_head, "active_adapters", []):
        if adapter in getattr(lm_head, "lora_A", {}):
            weight += lm_head.get_delta_weight(adapter).detach()
    return weight


# Construction -----------------------------------------------------------------------------------


def build_heads(model: nn.Module, config: HeadsConfig) -> AuxiliaryHeads:
    """Build new heads for `model`: transformer heads copy its last decoder layer, linear heads start at zero.

    Each head gets its own, freshly copied modules; no module is shared between heads.
    NOTE: the copy reads the local weights; under FSDP or meta-device loading build the heads
    before sharding, when the last layer's weights are complete on every process.
    """
    last_layer = find_decoder_layers(model)[-1]
    if any("lora_" in name for name, _ in last_layer.named_modules()):
        raise ValueError("Add the auxiliary heads before applying LoRA: the last decoder layer already holds adapters.")
    lm_head = model.get_output_embeddings()
    dtype = next(last_layer.parameters()).dtype
    hidden_size = model.config.get_text_config().hidden_size
    config.hidden_size = hidden_size
    config.vocab_size = lm_head.weight.shape[0] if lm_head is not None else 0
    config.model_type = getattr(model.config, "model_type", "")
    if not config.base_model:
        config.base_model = getattr(model.config, "_name_or_path", "") or ""

    heads = []
    for _ in range(config.num_heads):
        if config.arch == "transformer":
            layers = nn.ModuleList(copy.deepcopy(last_layer) for _ in range(config.num_layers))
        else:
            layers = nn.ModuleList(ResidualSiLU(hidden_size, dtype=dtype) for _ in range(config.num_layers))
        own_head = None
        if config.separate_unembed:
            weight = unembedding_weight(model)
            own_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
            own_head.weight.data.copy_(weight)
        heads.append(AuxiliaryHead(layers, own_head))
    device = next(model.parameters()).device
    return AuxiliaryHeads(config, heads).to(device)


# Saving and loading ---------------------------------------------------------------------------


def merged_state_dict(heads: AuxiliaryHeads) -> dict[str, torch.Tensor]:
    """Return the heads' weights with any LoRA adapter merged in, under the plain key layout."""
    state = {}
    lora_modules = {}
    for name, module in heads.heads.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            lora_modules[name] = module
    for name, tensor in heads.heads.state_dict().items():
        if ".lora_" in name or "lora_magnitude" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        state[clean] = tensor.detach().clone()
    for name, module in lora_modules.items():
        weight = module.base_layer.weight.detach().clone()
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight += module.get_delta_weight(adapter).detach()
        state[f"{name}.weight"] = weight
    return {key: value.contiguous() for key, value in state.items()}


def save_heads(heads: AuxiliaryHeads, out_dir: str | Path, readme: str | None = None) -> Path:
    """Write a heads folder: config.json and model.safetensors (and an optional README.md)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(merged_state_dict(heads), str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(asdict(heads.config), indent=2) + "\n")
    if readme is not None:
        (out_dir / "README.md").write_text(readme)
    return out_dir


def infer_config_from_state(state: dict[str, torch.Tensor]) -> HeadsConfig:
    """Infer the number of heads, layers and unembedding layout from original-code `heads.pth` keys."""
    head_ids = {int(key.split(".")[0]) for key in state if key.split(".")[0].isdigit()}
    if not head_ids:
        raise ValueError("The heads file has no keys of the form '<head>.layers.<layer>....'.")
    layer_ids = {int(key.split(".")[2]) for key in state if key.startswith("0.layers.")}
    linear = any(key.startswith("0.layers.0.proj.") for key in state)
    return HeadsConfig(
        num_heads=max(head_ids) + 1,
        num_layers=max(layer_ids) + 1 if layer_ids else 1,
        arch="linear" if linear else "transformer",
        separate_unembed=any(key.startswith("0.lm_head.") for key in state),
    )


def read_heads_config(path: str | Path) -> HeadsConfig:
    """Read a heads folder's config.json; raise ValueError naming the file when it is not a JSON object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: invalid JSON ({error}). Restore the config.json that `caft train-heads` wrote.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return HeadsConfig.from_dict(data)


def load_safetensors_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a `.safetensors` file on the CPU, and raise ValueError naming it when it is truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .loading import invalid_weights_error

    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise invalid_weights_error(path, error) from error


def _load_pth_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a `heads.pth` with `torch.load(weights_only=True)`, and raise ValueError naming it when that fails."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"{path} is not a heads weights file ({type(error).__name__} while loading it with weights_only=True). "
            "Pass the heads folder that `caft train-heads` wrote, or its model.safetensors or heads.pth."
        ) from error


def read_heads_file(source: str | Path) -> tuple[HeadsConfig | None, dict[str, torch.Tensor], str]:
    """Read heads weights from a folder, a `.pth`/`.safetensors` file or a hub repo id.

    Returns (config or None for a bare weights file, state dict, description of where it came from).
    `.pth` files are loaded with `torch.load(weights_only=True)`. A path that does not exist is a
    hub repo id (`owner/name`) unless it starts with `/`, `.` or `~`, ends with `/`, or its parent
    folder exists here.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if weights_path.is_file():
            config = read_heads_config(config_path) if config_path.is_file() else None
            return config, load_safetensors_file(weights_path), str(path)
        if (path / "heads.pth").is_file():
            return None, _load_pth_file(path / "heads.pth"), str(path / "heads.pth")
        raise FileNotFoundError(f"Heads folder {path} contains neither {WEIGHTS_NAME} nor heads.pth.")
    if path.is_file():
        if path.suffix == ".safetensors":
            return None, load_safetensors_file(path), str(path)
        return None, _load_pth_file(path), str(path)
    from .loading import looks_like_local_path

    if looks_like_local_path(str(source)):
        raise FileNotFoundError(
            f"The heads path {source} does not exist. Check the path, or pass a heads folder, "
            "a heads.pth or .safetensors file, or a hub repo id of the form owner/name."
        )
    if str(source).count("/") == 1:
        return read_heads_from_hub(str(source))
    raise FileNotFoundError(f"Auxiliary heads not found at {source}: pass a heads folder, a heads.pth file or a hub repo id.")


def read_heads_from_hub(repo_id: str) -> tuple[HeadsConfig | None, dict[str, torch.Tensor], str]:
    """Download heads from a hub repo: a heads folder layout, or the original code's `heads.pth`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        try:
            weights_file = hf_hub_download(repo_id, WEIGHTS_NAME)
            config_file = hf_hub_download(repo_id, CONFIG_NAME)
        except EntryNotFoundError:
            pth_file = hf_hub_download(repo_id, "heads.pth")
            return None, torch.load(pth_file, map_location="cpu", weights_only=True), f"{repo_id}/heads.pth"
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"Could not download auxiliary heads from the hub repo {repo_id} ({type(error).__name__}: {error}). "
            "Without network access, pass a local heads folder or heads.pth with -hdir/--auxiliary-heads-dir."
        ) from error
    config = HeadsConfig.from_dict(json.loads(Path(config_file).read_text()))
    return config, load_safetensors_file(weights_file), repo_id


def load_heads_state(heads: AuxiliaryHeads, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `heads` strictly: missing or unexpected keys or shape mismatches raise, naming them."""
    expected = merged_state_dict(heads)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            details.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if mismatched:
            details.append(f"shape mismatches {mismatched[:8]}")
        raise ValueError(
            f"The auxiliary heads in {source} do not fit this model ({'; '.join(details)}). "
            "Check --caft-num-heads, --caft-num-layers, --head-arch and --separate-unembed, and that the heads "
            "were trained for this base model."
        )
    own = heads.heads.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            target_key = key if key in own else key.replace(".weight", ".base_layer.weight")
            own[target_key].copy_(tensor.to(own[target_key].dtype))
