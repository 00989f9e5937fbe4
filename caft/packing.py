"""Sample packing for `--packing`: several short conversations per row of up to --model-max-length tokens.

    caft train -ts train.jsonl -maxlen 1024 --packing

Tokenized samples ({"input_ids", "labels"} from caft.chat.build_dataset) are placed into rows by
best-fit decreasing bin packing, and each row gets `position_ids` that restart at 0 at every sample.
The collator then sends `position_ids` and no `attention_mask`. From position_ids alone, transformers
5.x (`masking_utils.find_packed_sequence_indices`, called by `create_causal_mask` when the 2D mask
is None and no KV cache is given) builds a block-diagonal causal mask for eager, sdpa and flex
attention, so no token attends to another sample. An all-ones attention_mask would switch that
detection off and let samples attend to each other. The auxiliary heads reuse the last decoder
layer's captured mask, and `caft.loss.head_targets` drops every head target that would point into
the next sample, so per-head losses equal those of the same samples run one per row.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import random
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)

# Attention implementations that build their mask with transformers' create_causal_mask, which
# detects packed rows from position_ids. The tests check eager and sdpa on CPU.
MASK_BASED_ATTENTION = ("eager", "sdpa", "flex_attention")


@dataclass
class PackingStats:
    """Fill statistics of a set of packed rows."""

    samples: int
    rows: int
    capacity: int
    """Row capacity in tokens (--model-max-length)."""
    tokens: int
    """Tokens of all samples together (the real tokens, no padding)."""

    @property
    def efficiency(self) -> float:
        """Real tokens / row capacity over all rows, between 0 and 1."""
        return self.tokens / max(self.rows * self.capacity, 1)

    def summary(self) -> str:
        return (
            f"{self.samples} samples ({self.tokens} tokens) in {self.rows} rows of up to {self.capacity} tokens, "
            f"packing efficiency {self.efficiency:.1%} (real tokens / row capacity)"
        )


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sample indices into bins of at most `capacity` tokens by best-fit decreasing.

    Samples are placed longest first (ties in index order), each into the open bin with the least free
    space that still fits it (ties to the oldest bin), or into a new bin. The result depends only on
    `lengths` and `capacity`. Indices within a bin are in ascending order.
    Raises ValueError for a sample longer than `capacity` or of length 0.
    """
    if capacity < 1:
        raise ValueError(f"The packing capacity must be at least 1 token, got {capacity}.")
    for index, length in enumerate(lengths):
        if length < 1 or length > capacity:
            raise ValueError(
                f"Sample {index} has {length} tokens; packing needs 1 to {capacity} tokens per sample. "
                "caft.chat.build_dataset truncates samples to max_length; pass the same value as the packing capacity."
            )

    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin index) of bins with room left, sorted
    for index in order:
        length = lengths[index]
        slot = bisect.bisect_left(free, (length, -1))  # first bin with at least `length` free tokens
        if slot == len(free):
            bins.append([index])
            bin_index, room = len(bins) - 1, capacity - length
        else:
            room, bin_index = free.pop(slot)
            bins[bin_index].append(index)
            room -= length
        if room > 0:
            bisect.insort(free, (room, bin_index))
    return [sorted(members) for members in bins]


def pack_rows(rows: list[dict], capacity: int, seed: int = 0) -> tuple[list[dict], PackingStats]:
    """Pack tokenized samples into rows of at most `capacity` tokens with position_ids restarting per sample.

    Every sample lands in exactly one row, unchanged. The packed rows are shuffled with `seed` (the
    order of samples inside a row is not), so the same rows, capacity and seed give the same output.
    """
    lengths = []
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        if len(row["labels"]) != length:
            raise ValueError(f"Sample {index} has {length} input_ids but {len(row['labels'])} labels.")
        lengths.append(length)

    packed = []
    for members in best_fit_decreasing(lengths, capacity):
        input_ids, labels, position_ids = [], [], []
        for index in members:
            input_ids.extend(rows[index]["input_ids"])
            labels.extend(rows[index]["labels"])
            position_ids.extend(range(lengths[index]))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    random.Random(seed).shuffle(packed)
    stats = PackingStats(samples=len(rows), rows=len(packed), capacity=capacity, tokens=sum(lengths))
    return packed, stats


def rows_per_step(per_device_batch_size: int, gradient_accumulation_steps: int, processes: int) -> int:
    """Rows in one optimizer step: per-device batch x gradient accumulation x processes."""
    return per_device_batch_size * gradient_accumulation_steps * processes


def steps_per_epoch(rows: int, per_device_batch_size: int, gradient_accumulation_steps: int, processes: int) -> int:
    """Optimizer steps in one epoch, as the transformers Trainer counts them (a last partial step counts)."""
    batches = math.ceil(rows / (per_device_batch_size * processes))
    return max(math.ceil(batches / gradient_accumulation_steps), 1)


def pack_datasets(config, train_rows: list[dict], eval_rows: list[dict], heads_only: bool = False):
    """Pack the training and held-out samples of a run and log the packing efficiency and rows per step.

    `heads_only` is True for `caft train-heads`, whose batch is --per-device-batch-size times
    --pretrain-bs-multiplier. For `caft train`, stage 2 uses --per-device-batch-size and stage 1
    (with --heads-pretraining) the multiplied size.
    Returns (packed training rows, packed held-out rows).
    """
    capacity = config.model_max_length
    packed_train, train_stats = pack_rows(train_rows, capacity, seed=config.seed)
    logger.info("Packed training data: %s", train_stats.summary())

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = config.gradient_accumulation_steps
    for stage, batch in _stage_batch_sizes(config, heads_only):
        logger.info(
            "Packed %s: %d rows per optimizer step (%d per device x %d accumulation x %d processes), %d steps per epoch",
            stage,
            rows_per_step(batch, accumulation, processes),
            batch,
            accumulation,
            processes,
            steps_per_epoch(train_stats.rows, batch, accumulation, processes),
        )

    packed_eval = eval_rows
    if eval_rows:
        packed_eval, eval_stats = pack_rows(eval_rows, capacity, seed=config.seed)
        logger.info("Packed held-out data: %s", eval_stats.summary())
    return packed_train, packed_eval


def _stage_batch_sizes(config, heads_only: bool) -> list[tuple[str, int]]:
    """(stage name, per-device batch size) of each training stage the run has."""
    stages = []
    if heads_only or config.heads_pretraining:
        stages.append(("heads training", config.per_device_batch_size * config.pretrain_bs_multiplier))
    if not heads_only:
        stages.append(("fine-tuning", config.per_device_batch_size))
    return stages


def check_packing_attention(model: nn.Module, config, heads_only: bool = False) -> None:
    """Reject attention implementations that would let packed samples attend to each other.

    NOTE: the flash attention rule is read from the transformers 5.25 source and was never run, because
    flash attention needs a GPU. `_flash_attention_forward` switches to the variable-length kernel
    from position_ids only when the batch has one row (`_is_packed_sequence`). A larger packed batch
    would attend across samples.
    """
    implementation = str(getattr(model.config, "_attn_implementation", None) or "sdpa")
    if implementation in MASK_BASED_ATTENTION:
        return
    per_device_batch_size = max(batch for _stage, batch in _stage_batch_sizes(config, heads_only))
    if "flash" in implementation:
        if per_device_batch_size > 1:
            raise ValueError(
                f"--packing with {implementation} needs a per-device batch of 1 row (got {per_device_batch_size}): "
                "transformers finds the sample boundaries of a packed row from position_ids only for a batch of one "
                "row. Pass --per-device-batch-size 1 (and --pretrain-bs-multiplier 1 for heads training) and raise "
                "--gradient-accumulation-steps, or use sdpa attention."
            )
        return
    raise ValueError(
        f"--packing does not support the attention implementation {implementation!r}: it may ignore the sample "
        f"boundaries in position_ids. Use one of {', '.join(MASK_BASED_ATTENTION)}, or train without --packing."
    )
