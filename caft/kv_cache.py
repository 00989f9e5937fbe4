"""A KV cache for speculative decoding that writes new positions in place instead of concatenating.

transformers' `DynamicLayer` builds a new tensor from the whole cache plus the new keys at every
forward, in every layer. Speculative decoding runs one forward per step and crops or reorders
the cache after each. Here each layer keeps its keys and values as views into buffers with
spare room instead. A forward writes its positions into the buffers, which double when full.
Cropping and the in-place reordering of `keep_cache_positions` act on the views as they act on
`DynamicLayer`'s tensors.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 256
"""Positions reserved by a layer's first buffers."""


class ReservedLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are views of the first positions of larger buffers."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._keys_in_buffers() or end > self.key_buffer.shape[-2]:
            self._grow(max(2 * end, MIN_CAPACITY), key_states, value_states, length)
        self.key_buffer[..., length:end, :] = key_states
        self.value_buffer[..., length:end, :] = value_states
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values

    def _keys_in_buffers(self) -> bool:
        """Return whether the keys and values are still views of the buffers (batch operations replace them)."""
        return (
            self.key_buffer is not None
            and self.keys.data_ptr() == self.key_buffer.data_ptr()
            and self.values.data_ptr() == self.value_buffer.data_ptr()
        )

    def _grow(self, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor, length: int) -> None:
        """Allocate buffers of `capacity` positions and copy the `length` cached positions into them."""
        key_shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
        value_shape = (*value_states.shape[:-2], capacity, value_states.shape[-1])
        key_buffer = key_states.new_empty(key_shape)
        value_buffer = value_states.new_empty(value_shape)
        if length:
            key_buffer[..., :length, :] = self.keys
            value_buffer[..., :length, :] = self.values
        self.key_buffer, self.value_buffer = key_buffer, value_buffer


def reserved_cache(config) -> DynamicCache:
    """Return a DynamicCache for `config` whose full-attention layers are ReservedLayers.

    Sliding-window and other special layers stay as transformers builds them.
    """
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
