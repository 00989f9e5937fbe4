"""The CAFT loss: per-head chunked cross-entropy, target counting and the head schedules.

Head 0 is the model's own next-token head; auxiliary head k (k >= 1) predicts token t+1+k from the
state at position t. With labels aligned to input_ids (the transformers convention), the target of
head k at position t is `labels[t + 1 + k]`.

    loss = w_0 * CE_0 + beta * s(step) * sum_k gamma^k * CE_k

Each CE_k is a summed token loss divided by head k's count of valid targets over the whole optimizer
step (all gradient-accumulation micro-batches and all processes). The caller passes those counts; a
micro-batch then contributes exactly its share, so 4 micro-batches of 1 row give the gradients of one
micro-batch of 4 rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fused_ce import frozen_linear_cross_entropy

IGNORE_INDEX = -100
SCHEDULES = ("constant", "linear", "sine", "rsine", "sine_<r>")


def schedule_value(name: str, step: int, max_steps: int) -> float:
    """Return the schedule coefficient s(t) for progress p = step / max_steps.

    `constant` 1, `linear` p, `sine` sin(p*pi/2), `rsine` sin((1-p)*pi/2), and `sine_<r>` (for example
    `sine_0.3`) sin(p/r*pi/2) until p reaches r, then 1.
    """
    p = min(max(step / max(max_steps, 1), 0.0), 1.0)
    if name == "constant":
        return 1.0
    if name == "linear":
        return p
    if name == "sine":
        return math.sin(p * math.pi / 2)
    if name == "rsine":
        return math.sin((1 - p) * math.pi / 2)
    if name.startswith("sine_"):
        r = parse_sine_ratio(name)
        return 1.0 if p >= r else math.sin(p / r * math.pi / 2)
    raise ValueError(f"Unknown CAFT schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")


def parse_sine_ratio(name: str) -> float:
    """Parse r from a `sine_<r>` schedule name and check 0 < r <= 1."""
    try:
        r = float(name[len("sine_"):])
    except ValueError:
        raise ValueError(f"Invalid CAFT schedule {name!r}: expected sine_<r> with a number r, e.g. sine_0.5.") from None
    if not 0 < r <= 1:
        raise ValueError(f"Invalid CAFT schedule {name!r}: r must be in (0, 1].")
    return r


def sample_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Number the packed samples of each row: a new sample starts wherever position_ids is 0.  # (B, T)"""
    return torch.cumsum((position_ids == 0).long(), dim=-1)


def head_targets(labels: torch.Tensor, k: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Return the targets of head k at positions 0..T-2-k: labels shifted left by 1+k.  # (B, T-1-k)

    With packed rows (position_ids restarting at each sample), a target taken from another sample
    than the position's own is set to IGNORE_INDEX, so no head reads across a sample boundary.
    """
    shift = 1 + k
    targets = labels[:, shift:]
    if position_ids is not None:
        ids = sample_ids(position_ids)
        crosses = ids[:, shift:] != ids[:, :-shift]
        targets = targets.masked_fill(crosses, IGNORE_INDEX)
    return targets


def count_targets(labels: torch.Tensor, num_heads: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Count the valid targets of head 0..num_heads in one batch.  # (num_heads + 1,)"""
    counts = [
        (head_targets(labels, k, position_ids) != IGNORE_INDEX).sum() if labels.shape[1] > 1 + k else labels.new_zeros(())
        for k in range(num_heads + 1)
    ]
    return torch.stack(counts).long()


class Unembedding:
    """Hidden states to logits: an unembedding module (lm_head) with optional logit softcapping (Gemma)."""

    def __init__(self, module: nn.Module, softcap: float | None = None):
        self.module = module
        self.softcap = softcap or None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def frozen_linear(self) -> bool:
        """Whether it is a plain, frozen nn.Linear, so the fused cross-entropy applies."""
        module = self.module
        if type(module) is not nn.Linear or module.weight.requires_grad:
            return False
        return module.bias is None or not module.bias.requires_grad


def _token_losses(hidden: torch.Tensor, targets: torch.Tensor, unembed: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Unembed hidden states, return per-token cross-entropy (float32) and top-1 hits.  # (N,), (N,)"""
    logits = unembed(hidden).float()  # (N, V)
    losses = F.cross_entropy(logits, targets, reduction="none")
    hits = logits.detach().argmax(dim=-1) == targets
    return losses, hits


@dataclass
class HeadLoss:
    """One head's summed token loss (attached to the graph) and its statistics for logging."""

    loss_sum: torch.Tensor  # scalar, attached
    count: torch.Tensor  # scalar long, valid targets in this micro-batch
    correct: torch.Tensor  # scalar long, top-1 hits
    row_stats: torch.Tensor  # (B, 3): per row (loss sum, count, correct), detached


def chunked_head_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    unembed: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> HeadLoss:
    """Summed cross-entropy of one head, unembedding only positions with a valid target, chunk by chunk.

    hidden: (B, S, H) states at the positions that predict `targets` (B, S). Ignored positions are
    dropped before the unembedding. With a frozen plain nn.Linear unembedding the gradient for the
    states is computed during the forward pass (fused_ce.py); otherwise each chunk's logits are
    recomputed in the backward pass (activation checkpointing). Either way at most one
    (chunk_size, V) logits tensor exists at a time.
    With no valid target, the loss is 0 but still attached to every parameter the head uses.
    """
    batch = hidden.shape[0]
    valid = targets != IGNORE_INDEX  # (B, S)
    rows, positions = valid.nonzero(as_tuple=True)
    row_stats = hidden.new_zeros((batch, 3), dtype=torch.float32)
    if rows.numel() == 0:
        zero = unembed(hidden[:1, :1]).float().sum() * 0.0
        count = torch.zeros((), dtype=torch.long, device=hidden.device)
        return HeadLoss(zero, count, count.clone(), row_stats)

    selected = hidden[rows, positions]  # (N, H)
    flat_targets = targets[rows, positions]  # (N,)
    needs_grad = torch.is_grad_enabled() and selected.requires_grad
    if needs_grad and isinstance(unembed, Unembedding) and unembed.frozen_linear():
        module = unembed.module
        loss_sum, losses, hits = frozen_linear_cross_entropy(
            selected, module.weight, module.bias, flat_targets, chunk_size, unembed.softcap
        )
        row_stats[:, 0].index_add_(0, rows, losses.detach())
        row_stats[:, 1].index_add_(0, rows, torch.ones_like(losses))
        row_stats[:, 2].index_add_(0, rows, hits.float())
        return HeadLoss(loss_sum, valid.sum(), hits.sum(), row_stats)

    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, selected.shape[0], chunk_size):
        end = start + chunk_size
        if needs_grad:
            losses, hits = checkpoint(
                _token_losses, selected[start:end], flat_targets[start:end], unembed, use_reentrant=False
            )
        else:
            losses, hits = _token_losses(selected[start:end], flat_targets[start:end], unembed)
        loss_sum = loss_sum + losses.sum()
        correct = correct + hits.sum()
        chunk_rows = rows[start:end]
        row_stats[:, 0].index_add_(0, chunk_rows, losses.detach())
        row_stats[:, 1].index_add_(0, chunk_rows, torch.ones_like(losses, dtype=torch.float32))
        row_stats[:, 2].index_add_(0, chunk_rows, hits.float())
    return HeadLoss(loss_sum, valid.sum(), correct, row_stats)


def plain_head_loss(hidden: torch.Tensor, targets: torch.Tensor, unembed: Callable) -> torch.Tensor:
    """Reference: summed cross-entropy over full (B, S, V) logits. Tests compare chunked_head_loss to it."""
    logits = unembed(hidden).float()  # (B, S, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def head_weights(num_heads: int, beta: float, gamma: float, schedule: float, main_weight: float = 1.0) -> list[float]:
    """Return the weight of each head's normalised loss: [w_0, beta*s*gamma^1, ..., beta*s*gamma^n]."""
    return [main_weight] + [beta * schedule * gamma**k for k in range(1, num_heads + 1)]


def combine_head_losses(
    head_losses: list[HeadLoss],
    weights: list[float],
    num_items: torch.Tensor | None = None,
    step: int | None = None,
) -> torch.Tensor:
    """Weight and normalise each head's summed loss by its target count, and add them up.

    num_items: (num_heads + 1,) valid-target counts over the whole optimizer step. When None, the
    micro-batch's own counts are used (a per-batch mean, as in evaluation).
    Raises FloatingPointError naming the head and step when a loss is not finite.
    """
    total = None
    for k, (head, weight) in enumerate(zip(head_losses, weights)):
        count = num_items[k] if num_items is not None else head.count
        normalised = head.loss_sum / count.clamp(min=1).to(head.loss_sum.dtype)
        if not torch.isfinite(normalised.detach()):
            where = f" at step {step}" if step is not None else ""
            raise FloatingPointError(
                f"The loss of head {k} is {normalised.item()}{where}. Lower the learning rate, check the data, "
                "or train in float32."
            )
        term = normalised * weight
        total = term if total is None else total + term
    return total
