"""The in-place KV cache of speculative decoding contains what transformers' DynamicCache contains, step for step."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from caft.generate import keep_cache_positions
from caft.kv_cache import MIN_CAPACITY, ReservedLayer, reserved_cache


def assert_same_cache(reserved: DynamicCache, dynamic: DynamicCache) -> None:
    assert reserved.get_seq_length() == dynamic.get_seq_length()
    for mine, theirs in zip(reserved.layers, dynamic.layers):
        assert torch.equal(mine.keys, theirs.keys)
        assert torch.equal(mine.values, theirs.values)


def test_reserved_cache_follows_dynamic_cache():
    """Blocks, crops and reorders past the first capacity give the same cache and the same logits."""
    model = tiny_model("llama").eval()
    tokens = torch.randint(0, 128, (1, MIN_CAPACITY * 3), generator=torch.Generator().manual_seed(0))
    reserved, dynamic = reserved_cache(model.config), DynamicCache(config=model.config)
    assert all(type(layer) is ReservedLayer for layer in reserved.layers)
    position, step = 0, 0
    with torch.no_grad():
        while position + 9 <= tokens.shape[1]:
            size = 1 + step % 9  # blocks of 1 to 9 tokens
            block = tokens[:, position : position + size]
            logits = [model(input_ids=block, cache=cache, use_cache=True).logits for cache in (reserved, dynamic)]
            assert torch.equal(logits[0], logits[1])
            path = list(range(0, size, 2))  # keep every other block position, as an accepted tree path would
            for cache in (reserved, dynamic):
                keep_cache_positions(cache, position, path)
            assert_same_cache(reserved, dynamic)
            position += len(path)
            step += 1
    assert position > MIN_CAPACITY * 2  # the buffers grew at least twice
    assert reserved.layers[0].key_buffer.shape[-2] >= position


def test_reserved_layer_after_batch_operation():
    """A batch operation replaces the keys with new tensors; the next update starts from them, not from stale buffers."""
    layer = ReservedLayer()
    keys, values = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    layer.update(keys, values)
    layer.batch_select_indices(torch.tensor([1]))
    new_keys, new_values = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)

    all_keys, all_values = layer.update(new_keys, new_values)

    assert torch.equal(all_keys, torch.cat([keys[1:], new_keys], dim=-2))
    assert torch.equal(all_values, torch.cat([values[1:], new_values], dim=-2))


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_reserved_cache_keeps_special_layers(arch):
    """Sliding-window layers stay transformers' own; full-attention layers become ReservedLayers."""
    model = tiny_model(arch)
    dynamic = DynamicCache(config=model.config)

    reserved = reserved_cache(model.config)

    for mine, theirs in zip(reserved.layers, dynamic.layers):
        if type(theirs) is DynamicLayer:
            assert type(mine) is ReservedLayer
        else:
            assert type(mine) is type(theirs)
