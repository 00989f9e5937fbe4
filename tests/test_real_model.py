"""A few CAFT steps on the real SmolLM2-135M-Instruct with real GSM8K rows."""

import json
import math

import pytest

from caft.config import TrainConfig
from caft.train import run_train

pytestmark = pytest.mark.real_model


def test_caft_lora_steps_on_smollm2_and_gsm8k(gsm8k_files, tmp_path):
    train, test = gsm8k_files
    config = TrainConfig(
        model_name_or_path="smollm2",
        train_set=str(train),
        eval_set=str(test),
        eval_size=4,
        size=8,
        prompt_field="question",
        response_field="answer",
        model_max_length=256,
        per_device_batch_size=2,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-4,
        output_dir=str(tmp_path / "run"),
    )
    result = run_train(config)

    before = result.metrics_before["eval_loss_by_head"]
    after = result.metrics_after["eval_loss_by_head"]
    assert len(before) == len(after) == 5
    assert all(math.isfinite(loss) for loss in before + after)
    # The instruct model already answers GSM8K-style text well: its own next-token loss is low.
    assert before[0] < 2.5
    # Untrained heads are copies of the last layer, predicting t+1 instead of t+1+k: far worse than head 0.
    assert min(before[1:]) > before[0] + 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["finetuning"]["train_loss"] > 0
    log = (tmp_path / "run" / "loss_log.csv").read_text()
    assert "loss_head_4" in log.splitlines()[0]
