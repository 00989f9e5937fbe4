"""Attach auxiliary heads to a causal LM and compute the CAFT loss inside its forward pass.

`add_auxiliary_heads(model)` adds `model.caft_heads` and replaces the model's `forward` so that a call
with `labels` returns the CAFT loss. The loss is computed inside the model's forward so that
DDP, FSDP and DeepSpeed see one forward pass. A call without labels (generation) runs the original
forward and never touches the heads, so inference costs nothing extra.

The heads read the inputs of the last decoder layer through a forward pre-hook, so they get exactly
the position embeddings and attention mask that layer gets, for any architecture.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from .heads import AuxiliaryHeads, HeadsConfig, build_heads, find_decoder, find_decoder_layers, find_final_norm
from .loss import HeadLoss, Unembedding, chunked_head_loss, combine_head_losses, head_targets, head_weights

logger = logging.getLogger(__name__)

MODES = ("caft", "heads_only", "default")
# Keyword arguments of a decoder layer that refer to the KV cache; the heads never read or write it.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class CAFTState:
    """Loss settings and training progress, read by the patched forward. Not a module: holds no weights."""

    mode: str = "caft"
    """`caft` (CE_0 + auxiliary terms), `heads_only` (stage 1: trunk frozen under no_grad) or `default` (CE_0 only)."""
    beta: float = 0.01
    gamma: float = 0.8
    schedule: str = "rsine"
    schedule_value: float = 1.0
    """s(t) for the current optimizer step; the trainer updates it before each step."""
    step: int = 0
    chunk_size: int = 1024
    """Positions per chunk of the chunked cross-entropy."""
    checkpoint_heads: bool = True
    """Recompute each head's layers in the backward pass instead of storing their activations."""

    def weights(self, num_heads: int) -> list[float]:
        if self.mode == "heads_only":
            return [0.0] + [self.gamma**k for k in range(1, num_heads + 1)]
        if self.mode == "default":
            return [1.0] + [0.0] * num_heads
        return head_weights(num_heads, self.beta, self.gamma, self.schedule_value)


@dataclass
class CAFTOutput(ModelOutput):
    """Output of a forward pass with labels.

    `logits` is not the vocabulary logits: it is a (B, num_heads + 1, 3) tensor holding, per row and
    head, (summed token loss, target count, top-1 hits). Evaluation gathers it to compute exact
    token-weighted per-head metrics without ever materialising (B, T, V) logits.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    head_stats: torch.Tensor | None = None


class _Capture:
    """Holds the last decoder layer's inputs and output during one forward pass."""

    def __init__(self):
        self.active = False
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.output: torch.Tensor | None = None

    def clear(self):
        self.active, self.args, self.kwargs, self.output = False, (), {}, None


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """Return the transformers causal LM inside a PEFT or DDP wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif type(model).__name__.startswith("Peft") and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def add_auxiliary_heads(
    model: nn.Module,
    num_heads: int = 4,
    num_layers: int = 1,
    arch: str = "transformer",
    wiring: str = "sibling",
    separate_unembed: bool = False,
    heads: AuxiliaryHeads | None = None,
    state: CAFTState | None = None,
) -> nn.Module:
    """Add `num_heads` auxiliary heads to a transformers causal LM, in place, and return it.

    Call it before applying LoRA. Pass `heads` to attach heads built or loaded elsewhere.
    """
    model = unwrap_causal_lm(model)
    if hasattr(model, "caft_heads"):
        raise ValueError("This model already has auxiliary heads.")
    if heads is None:
        config = HeadsConfig(
            num_heads=num_heads, num_layers=num_layers, arch=arch, wiring=wiring, separate_unembed=separate_unembed
        )
        heads = build_heads(model, config)
    model.caft_heads = heads
    model.caft_state = state or CAFTState()
    capture = _Capture()
    model._caft_capture = capture
    last_layer = find_decoder_layers(model)[-1]

    def save_inputs(module, args, kwargs):
        if capture.active:
            capture.args, capture.kwargs = args, kwargs

    def save_output(module, args, kwargs, output):
        if capture.active:
            capture.output = output[0] if isinstance(output, tuple) else output

    model._caft_hooks = [
        last_layer.register_forward_pre_hook(save_inputs, with_kwargs=True),
        last_layer.register_forward_hook(save_output, with_kwargs=True),
    ]
    model._caft_original_forward = model.forward
    model.forward = types.MethodType(caft_forward, model)
    return model


def remove_auxiliary_heads(model: nn.Module) -> AuxiliaryHeads:
    """Detach the heads and restore the original forward; return the heads."""
    model = unwrap_causal_lm(model)
    heads = model.caft_heads
    for hook in model._caft_hooks:
        hook.remove()
    model.forward = model._caft_original_forward
    for name in ("caft_heads",):
        delattr(model, name)
    for name in ("caft_state", "_caft_capture", "_caft_hooks", "_caft_original_forward"):
        model.__dict__.pop(name, None)
    return heads


def make_unembed(model: nn.Module, own_head: nn.Module | None = None) -> Unembedding:
    """Return the map from hidden states to logits: lm_head (or a head's own), with any logit softcapping."""
    lm_head = own_head if own_head is not None else model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return Unembedding(lm_head, softcap)


def _head_layer_inputs(capture: _Capture) -> tuple[torch.Tensor, tuple, dict]:
    """Split the captured last-layer call into (hidden states, other args, kwargs without the KV cache)."""
    args, kwargs = capture.args, dict(capture.kwargs)
    if args:
        hidden, rest = args[0], tuple(args[1:])
    else:
        hidden, rest = kwargs.pop("hidden_states"), ()
    for name in _CACHE_KWARGS:
        if name in kwargs:
            kwargs[name] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return hidden, rest, kwargs


def run_heads(model: nn.Module, final_hidden: torch.Tensor) -> list[tuple[torch.Tensor, nn.Module | None]]:
    """Run every auxiliary head on the captured states; return per head (pre-unembedding states, own lm_head).

    While training, each head's layers run under activation checkpointing (when `caft_state.checkpoint_heads`),
    so a head keeps only its output states until the backward pass and memory does not grow with the
    number of heads; the price is one more forward pass of the head's layers.
    """
    heads: AuxiliaryHeads = model.caft_heads
    config = heads.config
    norm = find_final_norm(model)
    layer_hidden, layer_args, layer_kwargs = _head_layer_inputs(model._caft_capture)
    if config.arch == "linear":
        head_input, layer_args, layer_kwargs = model._caft_capture.output, (), {}
    elif config.wiring == "reference":
        head_input = final_hidden
    else:
        head_input = layer_hidden
    apply_norm = config.arch == "linear" or config.wiring == "sibling"
    use_checkpoint = getattr(model.caft_state, "checkpoint_heads", True) and torch.is_grad_enabled()

    outputs = []
    for head in heads.heads:

        def forward_head(hidden, head=head):
            hidden = head.forward_layers(hidden, layer_args, layer_kwargs)
            return norm(hidden) if apply_norm else hidden

        if use_checkpoint:
            hidden = checkpoint(forward_head, head_input, use_reentrant=False)
        else:
            hidden = forward_head(head_input)
        outputs.append((hidden, getattr(head, "lm_head", None)))
    return outputs


def caft_forward(
    self,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    caft_num_items: torch.Tensor | None = None,
    **kwargs,
):
    """Forward pass of a model with auxiliary heads; with labels, returns the CAFT loss as a CAFTOutput.

    caft_num_items: (num_heads + 1,) valid-target counts over the whole optimizer step (see loss.py).
    """
    kwargs.pop("num_items_in_batch", None)
    if labels is None:
        return self._caft_original_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )

    state: CAFTState = self.caft_state
    capture: _Capture = self._caft_capture
    num_heads = len(self.caft_heads)
    weights = state.weights(num_heads)
    kwargs["use_cache"] = False
    for name in _CACHE_KWARGS:
        kwargs.pop(name, None)
    capture.active = True
    try:
        # Stage 1 freezes the trunk, so it runs without building a graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and state.mode != "heads_only"):
            decoder_output = find_decoder(self)(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
            )
        final_hidden = decoder_output.last_hidden_state  # (B, T, H), after the final norm
        unembed = make_unembed(self)

        head_losses: list[HeadLoss] = []
        targets = head_targets(labels, 0, position_ids)  # (B, T-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and weights[0] != 0.0):
            head_losses.append(chunked_head_loss(final_hidden[:, :-1], targets, unembed, state.chunk_size))

        # The next-token baseline (`default`) trains head 0 alone; its frozen heads are only evaluated.
        if num_heads and not (state.mode == "default" and self.training):
            for k, (hidden, own_head) in enumerate(run_heads(self, final_hidden), start=1):
                targets = head_targets(labels, k, position_ids)  # (B, T-1-k)
                head_unembed = make_unembed(self, own_head) if own_head is not None else unembed
                if targets.shape[1] == 0:
                    targets = labels[:, :1].new_full((labels.shape[0], 1), -100)
                    hidden = hidden[:, :1]
                else:
                    hidden = hidden[:, : targets.shape[1]]
                head_losses.append(chunked_head_loss(hidden, targets, head_unembed, state.chunk_size))
    finally:
        capture.clear()

    loss = combine_head_losses(head_losses, weights, caft_num_items, step=state.step)
    row_stats = torch.stack([head.row_stats for head in head_losses], dim=1)  # (B, num_heads + 1, 3)
    head_stats = torch.stack(
        [torch.stack([h.loss_sum.detach().float(), h.count.float(), h.correct.float()]) for h in head_losses]
    )  # (num_heads + 1, 3)
    return CAFTOutput(loss=loss, logits=row_stats, head_stats=head_stats)
