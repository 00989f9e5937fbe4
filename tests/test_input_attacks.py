"""Unusual flag combinations and inputs for --eval-fraction and `caft distill` resume."""

import pytest


def test_eval_size_with_eval_fraction_rejected():
    from caft.config import TrainConfig

    with pytest.raises(ValueError, match="--eval-size .* no effect with --eval-fraction"):
        TrainConfig(train_set="train.jsonl", eval_fraction=0.2, eval_size=2)


def test_heads_readme_names_eval_fraction():
    from caft.config import TrainConfig
    from caft.train_heads import heads_readme

    config = TrainConfig(train_set="train.jsonl", eval_fraction=0.25, seed=7)
    text = heads_readme(config, {}, steps=1)

    assert "held-out: `0.25 of the training rows, seed 7`" in text


def test_distill_resume_rejects_other_dtype(tmp_path):
    from caft.distill import append_rows, check_settings

    out = tmp_path / "distilled.jsonl"
    settings = {"model": "smollm2", "max_new_tokens": 8, "greedy": True, "seed": 0, "dtype": "float32"}
    check_settings(out, settings)
    append_rows(out, [{"id": 0, "status": "OK", "conversation": [], "generated_tokens": 1}])

    with pytest.raises(ValueError, match="other settings"):
        check_settings(out, {**settings, "dtype": "bfloat16"})


def test_keep_truncated_empty_reply_skip_reason(smol_tokenizer):
    from caft.chat import build_dataset

    question = [{"role": "human", "content": "Count to ten."}]
    rows = [
        {"status": "OK", "conversation": question + [{"role": "assistant", "content": "1 2 3"}]},
        {"status": "TRUNCATED", "conversation": question + [{"role": "assistant", "content": ""}]},
    ]

    examples, stats = build_dataset(rows, smol_tokenizer, 1024, keep_truncated=True)

    assert len(examples) == 1
    assert not any(reason.startswith("no label left after truncation") for reason in stats.skipped), stats.skipped
    assert stats.skipped == {"status is TRUNCATED and the reply is empty": 1}


def test_distill_resume_old_settings_without_dtype(tmp_path):
    from caft.distill import check_settings

    out = tmp_path / "distilled.jsonl"
    settings = {"model": "smollm2", "max_new_tokens": 8, "greedy": True, "seed": 0}
    check_settings(out, settings)
    out.write_text("", encoding="utf-8")

    check_settings(out, {**settings, "dtype": "float32"})
    with pytest.raises(ValueError, match="dtype: 'float32' -> 'bfloat16'"):
        check_settings(out, {**settings, "dtype": "bfloat16"})
