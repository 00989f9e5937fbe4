"""Pad tokenized examples into training batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from caft.chat import IGNORE_INDEX

logger = logging.getLogger(__name__)


@dataclass
class CAFTCollator:
    """Right-pad `{"input_ids", "labels"}` examples into `input_ids`, `attention_mask` and `labels` tensors.

    Padding is marked by position (attention 0, label -100), never by token id, because the pad
    token is often the end-of-turn token, which stays labelled where the example contains it.

    Packed rows (from caft.packing, with `position_ids`) give `input_ids`, `position_ids` and `labels`
    and no `attention_mask`: transformers builds the block-diagonal causal mask from position_ids only
    when the mask is None. Padding then gets positions 0, 1, ... as a sample of its own, labelled -100.
    """

    pad_token_id: int
    """Token id written into padded positions of `input_ids`."""
    pad_to_multiple_of: int | None = None
    """Round the padded length up to a multiple of this number (e.g. 8 for tensor cores); None pads to the longest example."""

    def __post_init__(self) -> None:
        if not isinstance(self.pad_token_id, int) or self.pad_token_id < 0:
            raise ValueError(
                f"pad_token_id must be a token id (an int >= 0), got {self.pad_token_id!r}. "
                "Build the collator with make_collator(tokenizer), which falls back to the eos token."
            )
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be at least 1 or None, got {self.pad_to_multiple_of}.")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty batch.")
        lengths = [len(feature["input_ids"]) for feature in features]
        for index, feature in enumerate(features):
            if len(feature["labels"]) != lengths[index]:
                raise ValueError(
                    f"Example {index} of the batch has {lengths[index]} input_ids but {len(feature['labels'])} labels."
                )
        width = max(lengths)
        if self.pad_to_multiple_of is not None:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        batch_size = len(features)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)  # (B, T)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        if _is_packed_batch(features):
            return {"input_ids": input_ids, "position_ids": _packed_position_ids(features, width), "labels": labels}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _is_packed_batch(features: list[dict]) -> bool:
    packed = ["position_ids" in feature for feature in features]
    if any(packed) and not all(packed):
        raise ValueError("The batch mixes packed rows (with position_ids) and unpacked rows; pack all rows or none.")
    return all(packed)


def _packed_position_ids(features: list[dict], width: int) -> torch.Tensor:
    """Right-pad each row's position_ids with 0, 1, ..., so the padding is a separate sample.  # (B, T)"""
    position_ids = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        if len(feature["position_ids"]) != length:
            raise ValueError(
                f"Example {row} of the batch has {length} input_ids but {len(feature['position_ids'])} position_ids."
            )
        position_ids[row, :length] = torch.as_tensor(feature["position_ids"], dtype=torch.long)
        position_ids[row, length:] = torch.arange(width - length)
    return position_ids


def make_collator(tokenizer, pad_to_multiple_of: int | None = None) -> CAFTCollator:
    """Build a collator for `tokenizer`, setting its pad token to the eos token when it has none."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {tokenizer.name_or_path} has neither a pad token nor an eos token. "
                "Set tokenizer.pad_token before training."
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token; using the eos token %r for padding", tokenizer.eos_token)
    return CAFTCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
