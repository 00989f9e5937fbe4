"""Tests of the data readers (caft.data), build_dataset row accounting and the collator."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from caft.chat import IGNORE_INDEX, build_dataset
from caft.collator import CAFTCollator, make_collator
from caft.data import DataError, DataStats, load_dataset_rows, read_conversations

# Real data sets, read in place and never copied into the repository.
DATA_DIR = Path(os.environ.get("CAFT_TEST_DATA_DIR", "/work/shared/data"))
GSM8K_TRAIN = DATA_DIR / "gsm8k" / "train.jsonl"
MBPP = DATA_DIR / "mbpp" / "mbpp.jsonl"

USER_ASSISTANT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


# --- formats -------------------------------------------------------------------------------------


def test_caft_format_skips_status_not_ok(write_jsonl):
    rows = [
        {"id": 1, "status": "OK", "conversation": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"id": 2, "status": "FAILED", "conversation": []},
        {"id": 3, "status": "OK", "conversation": [
            {"role": "system", "content": "Be brief."},
            {"role": "human", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]},
    ]
    conversations, stats = read_conversations(write_jsonl(rows))

    assert conversations[0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert [m["role"] for m in conversations[1]] == ["system", "user", "assistant"]
    assert stats.rows_read == 3
    assert stats.rows_kept == 2
    assert stats.skipped == {"status is not OK": 1}


def test_messages_format(write_jsonl):
    rows = [{"messages": [{"role": "system", "content": "S"}, *USER_ASSISTANT, {"role": "user", "content": "u2"},
                          {"role": "assistant", "content": "a2"}]}]
    conversations, stats = read_conversations(write_jsonl(rows))

    assert [m["role"] for m in conversations[0]] == ["system", "user", "assistant", "user", "assistant"]
    assert conversations[0][4]["content"] == "a2"
    assert stats.rows_kept == 1


def test_sharegpt_format(write_jsonl):
    rows = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    conversations, _ = read_conversations(write_jsonl(rows))

    assert conversations == [[
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]]


def test_prompt_completion_format_with_system_field(write_jsonl):
    rows = [{"prompt": "q", "completion": "a", "sys": "Be brief."}]
    conversations, _ = read_conversations(write_jsonl(rows), system_field="sys")

    assert conversations == [[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]]


def test_field_mapping_overrides_detection(write_jsonl):
    rows = [{"prompt": "ignored", "completion": "ignored", "q": "question", "a": "answer"}]
    conversations, _ = read_conversations(write_jsonl(rows), prompt_field="q", response_field="a")

    assert conversations == [[{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]]


def test_field_mapping_skips_chat_format_files(write_jsonl, caplog):
    """The mapping flags of a question/answer training file do not break a held-out file in a chat format."""
    rows = [{"messages": USER_ASSISTANT}]
    with caplog.at_level("INFO", logger="caft.data"):
        conversations, _ = read_conversations(write_jsonl(rows), prompt_field="question", response_field="answer")

    assert conversations == [USER_ASSISTANT]
    assert any("do not apply to this file" in record.getMessage() for record in caplog.records)


def test_several_formats_in_a_row_are_named(write_jsonl, caplog):
    rows = [{"messages": USER_ASSISTANT, "prompt": "other", "completion": "other"}]
    with caplog.at_level("WARNING", logger="caft.data"):
        conversations, _ = read_conversations(write_jsonl(rows))

    assert conversations == [USER_ASSISTANT]
    assert any("OpenAI messages, prompt/completion); reading them as OpenAI messages" in record.getMessage()
               for record in caplog.records)


def test_empty_replies_are_counted_in_a_warning(write_jsonl, caplog):
    rows = [{"messages": USER_ASSISTANT}, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}]
    with caplog.at_level("WARNING", logger="caft.data"):
        conversations, stats = read_conversations(write_jsonl(rows))

    assert stats.rows_kept == 2
    assert any("1 rows have an empty assistant reply" in record.getMessage() for record in caplog.records)


@pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="GSM8K data not present")
def test_field_mapping_gsm8k():
    first = json.loads(GSM8K_TRAIN.open(encoding="utf-8").readline())
    conversations, stats = read_conversations(GSM8K_TRAIN, prompt_field="question", response_field="answer")

    assert stats.rows_read == stats.rows_kept == len(conversations) > 1000
    assert conversations[0] == [
        {"role": "user", "content": first["question"]},
        {"role": "assistant", "content": first["answer"]},
    ]


@pytest.mark.skipif(not MBPP.is_file(), reason="MBPP data not present")
def test_field_mapping_mbpp():
    first = json.loads(MBPP.open(encoding="utf-8").readline())
    conversations, _ = read_conversations(MBPP, prompt_field="text", response_field="code")

    assert conversations[0][0] == {"role": "user", "content": first["text"]}
    assert conversations[0][1] == {"role": "assistant", "content": first["code"]}


def test_json_list_and_wrapped_list(tmp_path):
    rows = [{"messages": USER_ASSISTANT}, {"messages": USER_ASSISTANT}]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(rows), encoding="utf-8")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": rows}), encoding="utf-8")

    for path in (plain, wrapped):
        conversations, stats = read_conversations(path)
        assert conversations == [USER_ASSISTANT, USER_ASSISTANT], path.name
        assert stats.rows_read == 2, path.name


def test_blank_lines_and_bom_are_not_rows(tmp_path):
    path = tmp_path / "data.jsonl"
    line = json.dumps({"prompt": "q", "completion": "a"})
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n\n   \n" + line.encode() + b"\n\n")

    conversations, stats = read_conversations(path)

    assert len(conversations) == 2
    assert stats.rows_read == 2


def test_in_memory_rows_humaneval():
    from caft.assets import humaneval_conversations

    rows = humaneval_conversations()
    conversations, stats = load_dataset_rows(rows)

    assert stats.rows_kept == len(rows) == 164
    assert conversations[0][0] == {"role": "user", "content": rows[0]["prompt"]}
    assert conversations[0][1] == {"role": "assistant", "content": rows[0]["completion"]}


# --- errors --------------------------------------------------------------------------------------

OK_MESSAGES = json.dumps({"messages": USER_ASSISTANT})

# (case id, file name, lines or raw bytes, reader keyword arguments, substrings the message must contain)
ERROR_CASES = [
    ("invalid json", "bad.jsonl", [OK_MESSAGES, '{"messages": [}'], {}, ["line 2", "invalid JSON", "column 15"]),
    ("non utf8", "bytes.jsonl", OK_MESSAGES.encode() + b"\n\n" + b'{"prompt": "caf\xe9"}\n', {},
     ["line 3", "invalid UTF-8 byte 0xe9", "byte 16"]),
    ("mapping field missing", "gsm.jsonl", [json.dumps({"question": "q", "solution": "a"})],
     {"prompt_field": "question", "response_field": "answer"}, ["line 1", "'answer'", "'question', 'solution'", "--response-field"]),
    ("format field missing", "mixed.jsonl", [OK_MESSAGES, json.dumps({"text": "x"})], {},
     ["line 2", "'messages'", "'text'", "--prompt-field"]),
    ("message content missing", "content.jsonl", [json.dumps({"messages": [{"role": "user"}]})], {},
     ["line 1", "'messages[0].content'", "'role'"]),
    ("content not a string", "parts.jsonl",
     [json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]})], {},
     ["line 1", "'messages[0].content'", "must be a string, got list"]),
    ("unknown role", "roles.jsonl", [json.dumps({"messages": [*USER_ASSISTANT, {"role": "tool", "content": "x"}]})], {},
     ["line 1", "'messages[2].role'", "'tool'", "system, user, assistant"]),
    ("sharegpt unknown role", "share.jsonl", [json.dumps({"conversations": [{"from": "user", "value": "q"}]})], {},
     ["line 1", "'conversations[0].from'", "system, human, gpt"]),
    ("empty conversation", "empty_conv.jsonl", [OK_MESSAGES, "", json.dumps({"messages": []})], {},
     ["line 3", "'messages'", "empty conversation"]),
    ("no assistant turn", "noreply.jsonl", [json.dumps({"conversation": [{"role": "human", "content": "q"}], "status": "OK"})], {},
     ["line 1", "'conversation'", "no assistant turn"]),
    ("assistant first", "first.jsonl", [json.dumps({"messages": USER_ASSISTANT[::-1]})], {},
     ["line 1", "'messages[0]'", "assistant turn"]),
    ("mixed formats", "mixed2.jsonl", [OK_MESSAGES, json.dumps({"prompt": "q", "completion": "a"})], {},
     ["line 2", "prompt/completion format", "OpenAI messages format"]),
    ("row not an object", "list.jsonl", [OK_MESSAGES, "[1, 2]"], {}, ["line 2", "expected a JSON object, got list"]),
    ("format not detected", "unknown.jsonl", [json.dumps({"question": "q", "answer": "a"})], {},
     ["line 1", "'question', 'answer'", "original CAFT: {", "ShareGPT: {", "prompt/completion: {", "--prompt-field"]),
    ("system field with conversations", "sys.jsonl", [OK_MESSAGES], {"system_field": "system"}, ["line 1", "--system-field"]),
    ("only prompt field", "half.jsonl", [OK_MESSAGES], {"prompt_field": "q"}, ["half.jsonl", "--response-field"]),
    ("empty file", "empty.jsonl", b"\n\n", {}, ["empty.jsonl", "no rows"]),
    ("unsupported extension", "data.csv", b"prompt,completion\n", {}, ["data.csv", "unsupported file extension '.csv'"]),
    ("json invalid", "bad.json", b'[\n  {"prompt": "q",\n   "completion": }\n]', {}, ["bad.json", "line 3", "invalid JSON"]),
    ("json non utf8", "bytes.json", b'[\n{"prompt": "\xff"}]', {}, ["bytes.json", "line 2", "0xff"]),
    ("json row field missing", "rows.json", json.dumps([{"prompt": "q", "completion": "a"}, {"prompt": "q"}]).encode(), {},
     ["rows.json", "index 1", "'completion'"]),
    ("json two lists", "two.json", json.dumps({"a": [], "b": []}).encode(), {}, ["two.json", "2 list fields"]),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_reader_error_names_place(tmp_path, case):
    _, name, content, kwargs, expected = case
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text("\n".join(content) + "\n", encoding="utf-8")

    with pytest.raises(DataError) as raised:
        read_conversations(path, **kwargs)

    message = str(raised.value)
    assert name in message
    for part in expected:
        assert part in message


def test_file_not_found_error(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: data file not found"):
        read_conversations(tmp_path / "missing.jsonl")


def test_in_memory_row_error_names_index():
    rows = [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": 4}]
    with pytest.raises(DataError, match=r"in-memory rows, index 1: field 'completion' must be a string"):
        load_dataset_rows(rows)


# --- stats and build_dataset ---------------------------------------------------------------------


def test_stats_summary_and_merge():
    first = DataStats(rows_read=3, rows_kept=2, skipped={"status is not OK": 1})
    second = DataStats(rows_read=5, rows_kept=3, skipped={"status is not OK": 1, "too long": 1})

    merged = first.merge(second)

    assert merged is first
    assert (first.rows_read, first.rows_kept) == (8, 5)
    assert first.skipped == {"status is not OK": 2, "too long": 1}
    assert first.summary() == "read 8 rows, kept 5, skipped 3 (status is not OK: 2, too long: 1)"
    assert DataStats(rows_read=1, rows_kept=1).summary() == "read 1 rows, kept 1"


def test_build_dataset_size_is_seeded(smol_tokenizer):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(20)]

    first, stats = build_dataset(rows, smol_tokenizer, 64, size=5, seed=1)
    again, _ = build_dataset(rows, smol_tokenizer, 64, size=5, seed=1)
    other, _ = build_dataset(rows, smol_tokenizer, 64, size=5, seed=2)

    assert first == again
    assert first != other
    assert len(first) == 5
    assert stats.rows_kept == 5
    assert stats.skipped == {"not selected (size=5)": 15}
    assert stats.rows_read == stats.rows_kept + sum(stats.skipped.values())


def test_build_dataset_counts_status_and_truncation(smol_tokenizer, write_jsonl, caplog):
    turn = [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long_turn = [{"role": "human", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    rows = [
        {"status": "OK", "conversation": turn},
        {"status": "ERROR", "conversation": turn},
        {"status": "OK", "conversation": long_turn},
    ]
    with caplog.at_level(logging.WARNING, logger="caft.chat"):
        examples, stats = build_dataset(write_jsonl(rows), smol_tokenizer, 64)

    assert len(examples) == 1
    assert stats.skipped == {"status is not OK": 1, "no label left after truncation to 64 tokens": 1}
    assert stats.rows_read == 3
    assert "Skipped 2 of 3 rows" in caplog.text


def test_build_dataset_nothing_left_raises(smol_tokenizer):
    rows = [{"prompt": "word " * 200, "completion": "ok"}]
    with pytest.raises(DataError, match=r"no usable rows left.*Raise the maximum length \(-maxlen\) above 32"):
        build_dataset(rows, smol_tokenizer, 32)


# --- collator ------------------------------------------------------------------------------------


def test_collator_right_pads():
    features = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = CAFTCollator(pad_token_id=0)(features)

    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_collator_pad_to_multiple_of():
    batch = CAFTCollator(pad_token_id=2, pad_to_multiple_of=8)([{"input_ids": [1] * 9, "labels": [1] * 9}])

    assert batch["input_ids"].shape == (1, 16)
    assert batch["attention_mask"].sum().item() == 9
    assert (batch["labels"][0, 9:] == IGNORE_INDEX).all()


def test_collator_rejects_bad_input():
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        CAFTCollator(pad_token_id=0)([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="pad_token_id must be a token id"):
        CAFTCollator(pad_token_id=None)


def test_make_collator_falls_back_to_eos(tokenizer_copy, caplog):
    tokenizer_copy.pad_token = None
    with caplog.at_level(logging.INFO, logger="caft.collator"):
        collator = make_collator(tokenizer_copy)

    assert collator.pad_token_id == tokenizer_copy.eos_token_id
    assert tokenizer_copy.pad_token == tokenizer_copy.eos_token
    assert "no pad token" in caplog.text


def test_make_collator_without_pad_or_eos_raises(tokenizer_copy):
    tokenizer_copy.pad_token = None
    tokenizer_copy.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        make_collator(tokenizer_copy)


def test_eval_fraction_split_is_disjoint_and_seeded(smol_tokenizer, write_jsonl):
    from caft.config import TrainConfig
    from caft.train import load_data

    path = write_jsonl([{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(20)])
    config = TrainConfig(train_set=str(path), eval_fraction=0.25, model_max_length=64, seed=3)

    train, held_out, train_stats, eval_stats = load_data(config, smol_tokenizer)
    again, held_out_again, _, _ = load_data(config, smol_tokenizer)
    _, other_held_out, _, _ = load_data(TrainConfig(train_set=str(path), eval_fraction=0.25, model_max_length=64, seed=4), smol_tokenizer)

    assert (len(train), len(held_out)) == (15, 5)
    assert train_stats.rows_kept == 20
    assert eval_stats is None
    train_ids = {tuple(row["input_ids"]) for row in train}
    held_out_ids = {tuple(row["input_ids"]) for row in held_out}
    assert len(train_ids | held_out_ids) == 20
    assert train_ids.isdisjoint(held_out_ids)
    assert (again, held_out_again) == (train, held_out)
    assert other_held_out != held_out


@pytest.mark.parametrize("settings, message", [
    (dict(eval_fraction=1.0), "between 0 and 1"),
    (dict(eval_fraction=0.1, eval_set="held_out.jsonl"), "either it or --eval-set"),
    (dict(eval_fraction=0.1, train_set=None), "pass -ts FILE with it"),
])
def test_eval_fraction_invalid_settings(settings, message):
    from caft.config import TrainConfig

    settings = {"train_set": "train.jsonl", **settings}
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_eval_fraction_too_few_rows(smol_tokenizer, write_jsonl):
    from caft.config import TrainConfig
    from caft.train import load_data

    path = write_jsonl([{"prompt": "question", "completion": "answer"}] * 3)
    config = TrainConfig(train_set=str(path), eval_fraction=0.1, model_max_length=64)
    with pytest.raises(ValueError, match=r"--eval-fraction 0.1 of 3 rows leaves an empty"):
        load_data(config, smol_tokenizer)


def test_keep_truncated_drops_end_of_turn_label(smol_tokenizer, write_jsonl):
    question = [{"role": "human", "content": "Count to ten."}]
    rows = [
        {"status": "OK", "conversation": question + [{"role": "assistant", "content": "1 2 3 4 5 6 7 8 9 10"}]},
        {"status": "TRUNCATED", "conversation": question + [{"role": "assistant", "content": "1 2 3 4"}]},
        {"status": "ERROR", "conversation": question + [{"role": "assistant", "content": "oops"}]},
    ]
    path = write_jsonl(rows)
    end_of_turn = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")

    skipped, skipped_stats = build_dataset(path, smol_tokenizer, 128)
    with_truncated, kept_stats = build_dataset(path, smol_tokenizer, 128, keep_truncated=True)

    assert len(skipped) == 1
    assert skipped_stats.skipped == {"status is not OK": 2}
    assert len(with_truncated) == 2
    assert kept_stats.skipped == {"status is not OK": 1}
    assert kept_stats.kept_truncated == 1
    assert "1 kept rows have a truncated reply" in kept_stats.summary()
    complete, cut = with_truncated
    complete_labels = [label for label in complete["labels"] if label != IGNORE_INDEX]
    cut_labels = [label for label in cut["labels"] if label != IGNORE_INDEX]
    assert complete_labels[-1] == end_of_turn
    assert end_of_turn not in cut_labels
    assert smol_tokenizer.decode(cut_labels) == "1 2 3 4"
    assert cut["input_ids"][len(cut["input_ids"]) - 2] == end_of_turn


def test_keep_truncated_counts_only_selected_rows(smol_tokenizer):
    turn = [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"status": "TRUNCATED", "conversation": turn} for _ in range(6)]

    examples, stats = build_dataset(rows, smol_tokenizer, 64, size=2, keep_truncated=True)

    assert len(examples) == 2
    assert stats.kept_truncated == 2
