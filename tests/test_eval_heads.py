"""`caft eval-heads`: chunked per-head top-1/top-5 metrics against plain references, and the command."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from caft.chat import build_dataset
from caft.collator import make_collator
from caft.eval_heads import evaluate_heads, format_results, load_heads
from caft.heads import save_heads
from caft.loss import IGNORE_INDEX, head_targets
from caft.model import make_unembed, run_heads

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}],
    [{"role": "user", "content": "Write a function that adds two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"}],
]


def messages_rows():
    return [{"messages": conversation} for conversation in CONVERSATIONS]


@pytest.fixture
def model_with_heads(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    load_heads(model, None, num_heads=3)
    with torch.no_grad():  # make the heads differ from the last layer and from each other
        for parameter in model.caft_heads.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture
def rows(smol_tokenizer):
    examples, _ = build_dataset(messages_rows(), smol_tokenizer, max_length=64)
    return examples


def plain_reference(model, batch):
    """Per head (loss sum, targets, top-1, top-5) from full (B, T, V) logits of one batch."""
    model.eval()
    labels = batch["labels"]
    capture = model._caft_capture
    capture.active = True
    try:
        with torch.no_grad():
            final = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            states = [final[:, :-1]] + [hidden for hidden, _ in run_heads(model, final)]
    finally:
        capture.clear()
    unembed = make_unembed(model)
    results = []
    for k, hidden in enumerate(states):
        targets = head_targets(labels, k)
        logits = unembed(hidden[:, : targets.shape[1]]).float()  # (B, S, V)
        valid = targets != IGNORE_INDEX
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        top5 = logits.topk(5, dim=-1).indices
        hits5 = ((top5 == targets[..., None]).any(-1) & valid).sum()
        hits1 = ((logits.argmax(-1) == targets) & valid).sum()
        results.append((loss.item(), int(valid.sum()), int(hits1), int(hits5)))
    return results


def test_metrics_equal_plain_logits(model_with_heads, rows, smol_tokenizer):
    collator = make_collator(smol_tokenizer)
    results = evaluate_heads(model_with_heads, rows, collator, batch_size=2, chunk_size=7)
    reference = plain_reference(model_with_heads, collator(rows))
    assert len(results) == 4
    for result, (loss_sum, targets, hits1, hits5) in zip(results, reference):
        assert result["targets"] == targets
        assert result["loss"] == pytest.approx(loss_sum / targets, rel=1e-5)
        assert result["top1"] == hits1 / targets
        assert result["top5"] == hits5 / targets
    # Every labelled token has a prompt token 1 + k before it, so each head scores every labelled token.
    assert len({result["targets"] for result in results}) == 1


def test_metrics_equal_training_forward(model_with_heads, rows, smol_tokenizer):
    """Loss and top-1 equal the per-row statistics of the patched forward used in training."""
    collator = make_collator(smol_tokenizer)
    batch = collator(rows)
    with torch.no_grad():
        row_stats = model_with_heads(**batch).logits  # (B, heads + 1, 3): loss sum, count, top-1 hits
    totals = row_stats.sum(dim=0)
    for result, (loss_sum, count, hits) in zip(evaluate_heads(model_with_heads, rows, collator), totals.tolist()):
        assert result["targets"] == count
        assert result["loss"] == pytest.approx(loss_sum / count, rel=1e-5)
        assert result["top1"] == hits / count


def test_top5_is_at_least_top1(model_with_heads, rows, smol_tokenizer):
    results = evaluate_heads(model_with_heads, rows, make_collator(smol_tokenizer))
    for result in results:
        assert 0 <= result["top1"] <= result["top5"] <= 1
        # Rank r's share of targets: rank 0 is top-1 and ranks 0-4 make up top-5 (float logits, no ties).
        ranks = result["rank_accuracy"]
        assert len(ranks) == 10
        assert sum(ranks) <= 1 + 1e-9
        assert ranks[0] == pytest.approx(result["top1"])
        assert sum(ranks[:5]) == pytest.approx(result["top5"])
    table = format_results(results)
    assert table.splitlines()[1].strip().startswith("0 (base)")
    assert len(table.splitlines()) == 5


def test_saved_heads_give_same_metrics(model_with_heads, rows, smol_tokenizer, tiny_model_dir, tmp_path):
    collator = make_collator(smol_tokenizer)
    expected = evaluate_heads(model_with_heads, rows, collator)
    save_heads(model_with_heads.caft_heads, tmp_path / "heads")
    reloaded = load_heads(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "heads"))
    assert evaluate_heads(reloaded, rows, collator) == expected


def test_command_writes_json_and_chart(tiny_model_dir, model_with_heads, tmp_path):
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in messages_rows()), encoding="utf-8")
    save_heads(model_with_heads.caft_heads, tmp_path / "heads")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "caft.cli", "eval-heads", "--model", str(tiny_model_dir), "--heads", str(tmp_path / "heads"),
         "--data", str(data), "-maxlen", "64", "--size", "2", "--num-heads", "5"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "--num-heads 5 is ignored" in result.stderr  # the saved heads decide
    report = json.loads((tmp_path / "heads" / "eval" / "eval_heads.json").read_text())
    assert report["rows"] == 2
    assert [entry["head"] for entry in report["heads_results"]] == [0, 1, 2, 3]
    assert (tmp_path / "heads" / "eval" / "eval_heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-5" in result.stdout


def test_heads_readme_lists_before_and_after():
    from caft.config import TrainConfig
    from caft.data import DataStats
    from caft.train_heads import heads_readme

    config = TrainConfig(train_set="distilled_train.jsonl", eval_set="distilled_eval.jsonl", caft_num_heads=2,
                         model_max_length=384, epochs=2, learning_rate=1e-3)
    after = {"eval_loss_by_head": [1.0, 2.0, 3.0], "eval_acc_head_0": 0.7, "eval_acc_head_1": 0.5, "eval_acc_head_2": 0.3}
    before = {"eval_loss_by_head": [1.0, 6.0, 7.0], "eval_acc_head_0": 0.7, "eval_acc_head_1": 0.1, "eval_acc_head_2": 0.05}
    train_stats = DataStats(rows_read=10, rows_kept=8, skipped={"status is not OK": 2})
    readme = heads_readme(config, after, 40, before, (train_stats, None))
    assert "| 1 | 2.0000 | 0.500 | 6.0000 | 0.100 |" in readme
    assert "| 2 | 3.0000 | 0.300 | 7.0000 | 0.050 |" in readme
    assert "train: read 10 rows, kept 8, skipped 2 (status is not OK: 2)" in readme
    assert "max length 384 tokens" in readme
    assert "40 (2 epoch(s))" in readme
    assert "| 1 | 2.0000 | 0.500 | - | - |" in heads_readme(config, after, 40)
