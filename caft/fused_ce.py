"""Linear cross-entropy that computes the input gradient during the forward pass, chunk by chunk.

For a frozen unembedding (LoRA fine-tuning, `-fr-unembed`, heads training) the only gradient a
head's cross-entropy needs is d loss / d hidden, an (N, H) tensor. Computing it chunk by chunk
while the (chunk, V) logits are at hand means the logits are never stored nor recomputed: the
backward pass only scales the saved (N, H) gradient. This is the idea of fused linear
cross-entropy kernels (e.g. Liger), written with plain torch operations.

The result equals the plain computation up to float32 rounding; tests compare both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _FrozenLinearCrossEntropy(torch.autograd.Function):
    """Summed CE of softcap(hidden @ weight.T + bias) against targets; gradient for hidden only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, softcap: float | None):
        count = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)  # (N, H)
        losses = torch.empty(count, dtype=torch.float32, device=hidden.device)  # (N,)
        hits = torch.empty(count, dtype=torch.bool, device=hidden.device)  # (N,)
        for start in range(0, count, chunk_size):
            end = min(start + chunk_size, count)
            chunk_targets = targets[start:end]
            logits = F.linear(hidden[start:end], weight, bias).float()  # (C, V)
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            log_norm = torch.logsumexp(logits, dim=-1)  # (C,)
            target_logits = logits.gather(1, chunk_targets[:, None]).squeeze(1)
            losses[start:end] = log_norm - target_logits
            hits[start:end] = logits.argmax(dim=-1) == chunk_targets

            # d CE / d logits = softmax - one_hot, then back through the softcap and the linear layer.
            grad_logits = torch.exp(logits - log_norm[:, None])
            grad_logits[torch.arange(end - start, device=logits.device), chunk_targets] -= 1.0
            if softcap:
                grad_logits *= 1.0 - capped * capped
            grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(losses, hits)
        return losses.sum(), losses, hits

    @staticmethod
    def backward(ctx, grad_loss, grad_losses, grad_hits):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None, None


def frozen_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (summed loss, per-token losses, top-1 hits) for hidden (N, H) and targets (N,).

    The weight and bias must not require gradients; use the checkpointed path otherwise.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("frozen_linear_cross_entropy needs a frozen unembedding; use the checkpointed path.")
    return _FrozenLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, softcap)
