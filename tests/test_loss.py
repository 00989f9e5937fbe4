"""Chunked per-head cross-entropy against the plain computation, target shifting, counts and schedules."""

import math

import pytest
import torch

from caft.loss import (
    IGNORE_INDEX,
    HeadLoss,
    chunked_head_loss,
    combine_head_losses,
    count_targets,
    head_targets,
    plain_head_loss,
    schedule_value,
)


def make_unembed(hidden_size=16, vocab=50, softcap=None, seed=0):
    torch.manual_seed(seed)
    lm_head = torch.nn.Linear(hidden_size, vocab, bias=False)

    def unembed(hidden):
        logits = lm_head(hidden)
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    return lm_head, unembed


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_equals_plain_loss_and_gradients(chunk_size, softcap):
    lm_head, unembed = make_unembed(softcap=softcap)
    torch.manual_seed(1)
    labels = torch.randint(0, 50, (3, 12))
    labels[0, :5] = IGNORE_INDEX
    labels[2, 9:] = IGNORE_INDEX
    for k in range(4):
        targets = head_targets(labels, k)  # (B, T-1-k)
        hidden = torch.randn(3, targets.shape[1], 16, requires_grad=True)

        plain = plain_head_loss(hidden, targets, unembed)
        plain_grads = torch.autograd.grad(plain, [hidden, lm_head.weight])
        chunked = chunked_head_loss(hidden, targets, unembed, chunk_size=chunk_size)
        chunked_grads = torch.autograd.grad(chunked.loss_sum, [hidden, lm_head.weight])

        assert torch.allclose(chunked.loss_sum, plain, rtol=1e-5, atol=1e-5), f"head {k}"
        for got, expected in zip(chunked_grads, plain_grads):
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), f"head {k}"
        assert int(chunked.count) == int((targets != IGNORE_INDEX).sum())
        assert torch.allclose(chunked.row_stats[:, 0].sum(), plain.detach(), rtol=1e-5)


def test_top1_hits_match_argmax():
    lm_head, unembed = make_unembed()
    hidden = torch.randn(2, 6, 16)
    targets = torch.randint(0, 50, (2, 6))
    targets[1, 4:] = IGNORE_INDEX
    result = chunked_head_loss(hidden, targets, unembed, chunk_size=4)
    predictions = unembed(hidden).argmax(-1)
    valid = targets != IGNORE_INDEX
    assert int(result.correct) == int(((predictions == targets) & valid).sum())


def test_head_targets_shift_by_one_plus_k():
    labels = torch.arange(10).unsqueeze(0)
    for k in range(4):
        targets = head_targets(labels, k)
        assert targets.shape == (1, 9 - k)
        # Position t of head k predicts token t+1+k.
        assert targets[0, 0].item() == 1 + k
        assert targets[0, -1].item() == 9


def test_head_targets_do_not_cross_packed_samples():
    # Two samples packed in one row: positions restart at 0 where the second sample begins.
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    sample_of_token = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2, 2]])
    labels = sample_of_token * 100 + torch.arange(9)
    for k in range(4):
        targets = head_targets(labels, k, position_ids)
        source_sample = sample_of_token[:, : targets.shape[1]]
        valid = targets != IGNORE_INDEX
        assert torch.all(targets[valid] // 100 == source_sample[valid]), f"head {k} crosses a sample"
        # Every position whose target lies in its own sample keeps it.
        expected_valid = sample_of_token[:, 1 + k :] == source_sample
        assert torch.equal(valid, expected_valid)


def test_count_targets_per_head():
    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 4:] = 7  # four labelled tokens at positions 4..7
    labels[1, 7] = 7  # one labelled token at the last position
    counts = count_targets(labels, num_heads=4)
    # Head k at position t reads labels[t+1+k]: every labelled position >= 1+k is a target.
    assert counts.tolist() == [5, 5, 5, 5, 4]
    labels[:, :] = IGNORE_INDEX
    assert count_targets(labels, num_heads=2).tolist() == [0, 0, 0]


def test_zero_targets_give_zero_loss_attached_to_graph():
    lm_head, unembed = make_unembed()
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    targets = torch.full((2, 5), IGNORE_INDEX)
    result = chunked_head_loss(hidden, targets, unembed)
    assert result.loss_sum.item() == 0.0
    assert result.loss_sum.requires_grad
    result.loss_sum.backward()
    assert lm_head.weight.grad is not None
    assert hidden.grad is not None
    assert torch.all(lm_head.weight.grad == 0)


def test_combine_normalises_by_step_counts_and_weights():
    sums = [torch.tensor(10.0), torch.tensor(6.0)]
    heads = [HeadLoss(s, torch.tensor(5), torch.tensor(0), torch.zeros(1, 3)) for s in sums]
    local = combine_head_losses(heads, [1.0, 0.5])
    assert math.isclose(local.item(), 10 / 5 + 0.5 * 6 / 5, rel_tol=1e-6)
    global_counts = torch.tensor([20, 10])
    step = combine_head_losses(heads, [1.0, 0.5], num_items=global_counts)
    assert math.isclose(step.item(), 10 / 20 + 0.5 * 6 / 10, rel_tol=1e-6)


def test_combine_raises_on_non_finite_naming_head_and_step():
    heads = [
        HeadLoss(torch.tensor(1.0), torch.tensor(1), torch.tensor(0), torch.zeros(1, 3)),
        HeadLoss(torch.tensor(float("nan")), torch.tensor(1), torch.tensor(0), torch.zeros(1, 3)),
    ]
    with pytest.raises(FloatingPointError, match=r"head 1 .* at step 7"):
        combine_head_losses(heads, [1.0, 1.0], step=7)


@pytest.mark.parametrize(
    "name,step,expected",
    [
        ("constant", 30, 1.0),
        ("linear", 25, 0.25),
        ("sine", 50, math.sin(0.5 * math.pi / 2)),
        ("rsine", 0, 1.0),
        ("rsine", 100, 0.0),
        ("rsine", 25, math.sin(0.75 * math.pi / 2)),
        ("sine_0.5", 25, math.sin(0.5 * math.pi / 2)),
        ("sine_0.5", 60, 1.0),
    ],
)
def test_schedules(name, step, expected):
    assert math.isclose(schedule_value(name, step, 100), expected, abs_tol=1e-9)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="Unknown CAFT schedule"):
        schedule_value("cosine", 1, 10)
    with pytest.raises(ValueError, match="sine_<r>"):
        schedule_value("sine_abc", 1, 10)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_fused_frozen_unembedding_equals_plain(softcap, chunk_size):
    from caft.loss import Unembedding

    torch.manual_seed(2)
    lm_head = torch.nn.Linear(16, 50, bias=True).requires_grad_(False)
    unembed = Unembedding(lm_head, softcap)
    assert unembed.frozen_linear()
    labels = torch.randint(0, 50, (3, 10))
    labels[1, :6] = IGNORE_INDEX
    for k in range(3):
        targets = head_targets(labels, k)
        hidden = torch.randn(3, targets.shape[1], 16, requires_grad=True)
        plain = plain_head_loss(hidden, targets, unembed)
        (plain_grad,) = torch.autograd.grad(plain * 0.7, hidden)
        fused = chunked_head_loss(hidden, targets, unembed, chunk_size=chunk_size)
        (fused_grad,) = torch.autograd.grad(fused.loss_sum * 0.7, hidden)
        assert torch.allclose(fused.loss_sum, plain, rtol=1e-5), f"head {k}"
        assert torch.allclose(fused_grad, plain_grad, rtol=1e-4, atol=1e-6), f"head {k}"
        predictions = unembed(hidden).argmax(-1)
        valid = targets != IGNORE_INDEX
        assert int(fused.correct) == int(((predictions == targets) & valid).sum())


def test_trainable_or_wrapped_unembedding_uses_checkpointed_path():
    from caft.loss import Unembedding

    trainable = torch.nn.Linear(4, 8)
    assert not Unembedding(trainable).frozen_linear()
    wrapped = torch.nn.Sequential(torch.nn.Linear(4, 8)).requires_grad_(False)
    assert not Unembedding(wrapped).frozen_linear()
