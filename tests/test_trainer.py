"""Real Trainer runs on tiny models: gradient accumulation, the original Python API, evaluation metrics, saving."""

import copy
import json

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_model
from transformers import TrainingArguments

from caft.collator import CAFTCollator
from caft.loss import IGNORE_INDEX, head_targets, plain_head_loss
from caft.model import add_auxiliary_heads, remove_auxiliary_heads
from caft.trainer import CAFTTrainer


def make_rows(count=4, length=14, vocab=128, seed=0):
    """Rows with different label spans; row 3 is labelled only at its last 2 positions, so heads 2+ get no target."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        ids = torch.randint(0, vocab, (length - index,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * 4 + ids[4:]
        if index == 3:
            labels = [IGNORE_INDEX] * (len(ids) - 2) + ids[-2:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def sgd_args(tmp_path, batch_size, accumulation, **extra):
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_steps=1,
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        dataloader_drop_last=False,
        seed=0,
        disable_tqdm=True,
        **extra,
    )


def one_sgd_step(tmp_path, batch_size, accumulation, mode="caft", freeze_unembedding=False):
    """Run one real Trainer step with SGD at lr 1 and return -delta per parameter (the gradient)."""
    model = tiny_model("llama", tie_word_embeddings=False)
    add_auxiliary_heads(model, num_heads=3)
    if freeze_unembedding:  # exercises the fused cross-entropy path
        model.lm_head.requires_grad_(False)
    model.caft_state.mode = mode
    model.caft_state.schedule = "constant"
    model.caft_state.beta = 0.5
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = CAFTTrainer(
        model=model,
        args=sgd_args(tmp_path, batch_size, accumulation),
        train_dataset=make_rows(),
        data_collator=CAFTCollator(pad_token_id=0),
    )
    trainer.train()
    return {name: before[name] - p.detach() for name, p in model.named_parameters()}, trainer


@pytest.mark.parametrize("mode,frozen", [("caft", False), ("caft", True), ("heads_only", False)])
def test_accumulation_matches_one_big_batch_per_head(tmp_path, mode, frozen):
    big, _ = one_sgd_step(tmp_path / "big", batch_size=4, accumulation=1, mode=mode, freeze_unembedding=frozen)
    small, trainer = one_sgd_step(tmp_path / "small", batch_size=1, accumulation=4, mode=mode, freeze_unembedding=frozen)
    for k in range(3):
        prefix = f"caft_heads.heads.{k}."
        names = [name for name in big if name.startswith(prefix)]
        assert names
        for name in names:
            assert torch.allclose(big[name], small[name], rtol=1e-4, atol=1e-6), f"head {k + 1}: {name}"
            assert big[name].abs().sum() > 0, f"head {k + 1} got no gradient: {name}"
    for name in big:
        assert torch.allclose(big[name], small[name], rtol=1e-4, atol=1e-6), name
    history = [entry for entry in trainer.state.log_history if "loss_head_0" in entry]
    assert history and all(f"acc_head_{k}" in history[0] for k in range(4))


def test_original_api_snippet(tmp_path, monkeypatch):
    import caft

    namespace = {}
    exec("from caft import *", namespace)
    for name in ("add_auxiliary_heads", "add_caft_loss", "CAFTSaveLogging", "caft_compute_metrics",
                 "preprocess_logits_for_metrics"):
        assert name in namespace, name

    monkeypatch.setattr(transformers, "Trainer", transformers.Trainer)  # restored after the test
    model = tiny_model("llama")
    caft.add_auxiliary_heads(model)
    caft.add_caft_loss(transformers)
    args = sgd_args(tmp_path, 2, 1, eval_strategy="steps", eval_steps=1, label_names=["labels"])
    args.learning_rate = 1e-3
    trainer = transformers.Trainer(
        model=model,
        args=args,
        callbacks=[caft.CAFTSaveLogging],
        compute_metrics=caft.caft_compute_metrics,
        preprocess_logits_for_metrics=caft.preprocess_logits_for_metrics,
        train_dataset=make_rows(),
        eval_dataset=make_rows(seed=1),
        data_collator=CAFTCollator(pad_token_id=0),
    )
    assert isinstance(trainer, CAFTTrainer)
    trainer.train()
    metrics = trainer.evaluate()
    assert len(metrics["eval_loss_by_head"]) == 5  # head 0 and the 4 default heads
    expected_real = sum(0.8**k * loss for k, loss in enumerate(metrics["eval_loss_by_head"]))
    assert metrics["eval_real_eval_loss"] == pytest.approx(expected_real, rel=1e-5)
    log = (tmp_path / "loss_log.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch,split")
    assert any(",eval," in line for line in log[1:]) and any(",train," in line for line in log[1:])


def test_eval_metrics_are_token_weighted_and_exact(tmp_path):
    model = tiny_model("llama").eval()
    add_auxiliary_heads(model, num_heads=2)
    rows = make_rows(seed=3)
    args = sgd_args(tmp_path, 3, 1, per_device_eval_batch_size=3, label_names=["labels"])
    trainer = CAFTTrainer(model=model, args=args, eval_dataset=rows, data_collator=CAFTCollator(pad_token_id=0))
    metrics = trainer.evaluate()

    reference = copy.deepcopy(model)
    heads = remove_auxiliary_heads(reference)
    batch = CAFTCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = head_targets(batch["labels"], 0)
        count = (targets != IGNORE_INDEX).sum()
        expected = plain_head_loss(logits[:, :-1], targets, lambda x: x) / count
    assert metrics["eval_loss_by_head"][0] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["eval_targets_head_0"] == count.item()
    assert len(heads) == 2


def test_saved_model_has_no_head_keys_and_loads_plainly(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("llama")
    add_auxiliary_heads(model, num_heads=2)
    args = sgd_args(tmp_path, 2, 1)
    args.learning_rate = 1e-3
    trainer = CAFTTrainer(model=model, args=args, train_dataset=make_rows(), data_collator=CAFTCollator(pad_token_id=0))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    keys = load_file(str(tmp_path / "final" / "model.safetensors")).keys()
    assert not [key for key in keys if "caft" in key]
    assert json.loads((tmp_path / "final" / "heads" / "config.json").read_text())["num_heads"] == 2
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 128, (1, 5))
    model.eval()
    with torch.no_grad():
        assert np.allclose(loaded(input_ids=ids).logits.numpy(), model(input_ids=ids).logits.numpy(), atol=1e-5)
