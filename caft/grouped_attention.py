"""SDPA attention that hands grouped key/value heads to PyTorch's CPU kernel instead of copying them.

With grouped-query attention (fewer key/value heads than query heads), an attention mask and
more than one query, transformers' SDPA attention copies each cached key and value head once for
every query head that shares it (`repeat_kv`), in every layer. It does so because its CUDA
kernels have no grouped heads with a mask. Speculative decoding verifies blocks of several
tokens with a mask at every step, so on CPU this copy grows with the context. PyTorch's CPU
kernel takes the groups as they are (`enable_gqa=True`). `grouped_attention_in_kernel` switches
the given modules to this attention for the duration of a `with` block.
"""

from __future__ import annotations

import contextlib

from torch import nn

NAME = "caft_grouped_sdpa"
"""The attention implementation name registered with transformers."""


def grouped_sdpa_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """Run transformers' SDPA attention, but with grouped key/value heads given to the kernel on CPU.

    Other devices, ungrouped heads, position biases and the cases that need transformers' own
    handling (a causal flag with more keys than queries) go to `sdpa_attention_forward` unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    plain = (
        query.device.type != "cpu" or groups == 1 or key.shape[-1] != value.shape[-1]
        or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
        or kwargs.get("output_attentions", False) or (causal and key.shape[2] != query.shape[2])
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    output = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the attention function and SDPA's mask builder under NAME (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, grouped_sdpa_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextlib.contextmanager
def grouped_attention_in_kernel(*modules: nn.Module):
    """Switch every config of `modules` that uses "sdpa" attention to NAME; restore them on exit.

    Only the configs reached from `modules` change, so other models in the process keep their
    attention. A nested block finds NAME set and leaves it. Where two threads overlap on one
    model, the first to leave ends the switch for both, which costs speed only: both attentions
    give the same result.
    """
    from transformers import PretrainedConfig

    configs = {}
    for module in modules:
        for submodule in module.modules():
            config = getattr(submodule, "config", None)
            if isinstance(config, PretrainedConfig) and config._attn_implementation == "sdpa":
                configs[id(config)] = config
    if configs:
        register()
    # NOTE: `_attn_implementation_internal` is transformers' private field behind `_attn_implementation` (5.x).
    # Setting it directly skips the setter's walk over sub-configs, which the configs found here already cover.
    for config in configs.values():
        config._attn_implementation_internal = NAME
    try:
        yield len(configs)
    finally:
        for config in configs.values():
            config._attn_implementation_internal = "sdpa"

