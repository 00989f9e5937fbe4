"""`caft inspect-data` with the real SmolLM2 tokenizer: marked tokens and counts equal what training uses."""

from __future__ import annotations

import re

import torch

from caft.chat import build_dataset
from caft.cli import main
from caft.collator import make_collator
from caft.inspect import COLOR_END, COLOR_START, inspect_file, render_tokens
from caft.loss import count_targets

END_OF_TURN = "<|im_end|>"
ROWS = [
    {"messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "3 + 3 = 6.\nDone."},
    ]},
    {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue"},
    ]},
    {"messages": [
        {"role": "user", "content": "Repeat after me: " + "word " * 120},
        {"role": "assistant", "content": "word"},
    ]},
]


def run_cli(capsys, *args) -> str:
    code = main(["inspect-data", *map(str, args)])
    output = capsys.readouterr().out
    assert code == 0, output
    return output


def row_blocks(output: str) -> list[str]:
    return re.findall(r"^=== row \d+ .*?(?=^=== )", output, flags=re.S | re.M)


def test_marked_text_is_assistant_turns(capsys, write_jsonl):
    path = write_jsonl(ROWS[:2])
    output = run_cli(capsys, path, "-n", 2, "--no-color")
    blocks = row_blocks(output)
    assert len(blocks) == 2
    for block, row in zip(blocks, ROWS):
        marked = re.findall(r"\[\[(.*?)\]\]", block, flags=re.S)
        replies = [m["content"] + END_OF_TURN for m in row["messages"] if m["role"] == "assistant"]
        assert marked == replies
    assert "\x1b[" not in output


def test_color_marks_same_tokens(capsys, write_jsonl):
    path = write_jsonl(ROWS[:1])
    plain = run_cli(capsys, path, "-n", 1, "--no-color")
    colored = run_cli(capsys, path, "-n", 1, "--color")
    assert COLOR_START in colored
    assert "[[" not in colored
    spans = re.findall(re.escape(COLOR_START) + "(.*?)" + re.escape(COLOR_END), colored, flags=re.S)
    assert spans == re.findall(r"\[\[(.*?)\]\]", row_blocks(plain)[0], flags=re.S)
    assert len(spans) == 2


def test_row_counts_match_training(capsys, write_jsonl, smol_tokenizer):
    path = write_jsonl(ROWS[:2])
    output = run_cli(capsys, path, "-n", 2, "--no-color", "-maxlen", 512, "-heads", 3)
    rows, _ = build_dataset(path, smol_tokenizer, 512)
    headers = re.findall(r"^=== row \d+ .*: (\d+) tokens, (\d+) labelled ===$", output, flags=re.M)
    assert [(int(a), int(b)) for a, b in headers] == [
        (len(row["input_ids"]), sum(label != -100 for label in row["labels"])) for row in rows
    ]
    per_row = re.findall(r"^valid targets: (.*)$", output, flags=re.M)[:2]
    for text, row in zip(per_row, rows):
        expected = count_targets(torch.tensor([row["labels"]]), 3).tolist()
        assert [int(n.replace(",", "")) for n in re.findall(r"head \d+ ([\d,]+)", text)] == expected


def test_file_counts_match_collated_batch(write_jsonl, smol_tokenizer):
    """The whole-file per-head targets equal what the trainer counts on a padded training batch."""
    path = write_jsonl(ROWS)
    max_length = 48
    report = inspect_file(path, smol_tokenizer, max_length, num_heads=4)
    rows, stats = build_dataset(path, smol_tokenizer, max_length)
    batch = make_collator(smol_tokenizer)(rows)
    assert report.head_targets == count_targets(batch["labels"], 4).tolist()
    assert report.total_tokens == int(batch["attention_mask"].sum())
    assert report.labelled_tokens == int((batch["labels"] != -100).sum())
    assert report.stats.skipped == stats.skipped
    assert report.stats.rows_kept == 2


def test_truncation_reported(capsys, write_jsonl):
    path = write_jsonl(ROWS)
    output = run_cli(capsys, path, "-n", 3, "--no-color", "-maxlen", 48)
    assert re.search(r"=== row 3 .*: DROPPED, \d+ tokens, all \d+ labelled tokens lie beyond the 48-token limit", output)
    assert re.search(r"^cut from \d+ to 48 tokens; \d+ labelled tokens lost$", output, flags=re.M)
    assert "read 3 rows, kept 2, skipped 1 (no label left after truncation to 48 tokens: 1)" in output
    assert "rows exactly 48 tokens long (cut by --model-max-length, or that long): 1" in output


def test_head_targets_skip_first_positions(smol_tokenizer):
    """Labels on the first tokens give head k k fewer targets: it has no position t with t+1+k there."""
    ids = smol_tokenizer("one two three four five six", add_special_tokens=False)["input_ids"]
    labels = list(ids)
    counts = count_targets(torch.tensor([labels]), 3).tolist()
    assert counts == [len(ids) - 1 - k for k in range(4)]
    assert render_tokens(smol_tokenizer, ids, labels, color=False) == "[[one two three four five six]]"


def test_missing_file_is_input_error(capsys, tmp_path):
    code = main(["inspect-data", str(tmp_path / "absent.jsonl")])
    assert code == 2
    assert "absent.jsonl not found" in capsys.readouterr().err


def test_field_mapping_flags(capsys, write_jsonl):
    path = write_jsonl([{"question": "2+2?", "answer": "4"}])
    output = run_cli(capsys, path, "--prompt-field", "question", "--response-field", "answer", "--no-color")
    assert "2+2?<|im_end|>" in output
    assert "[[4<|im_end|>]]" in output


def test_size_selects_training_rows(write_jsonl, smol_tokenizer):
    """With --size the counts cover the rows `caft train --size` selects, after the same seeded shuffle."""
    path = write_jsonl(ROWS)
    report = inspect_file(path, smol_tokenizer, 512, num_heads=2, size=1, seed=7)
    rows, stats = build_dataset(path, smol_tokenizer, 512, size=1, seed=7)
    assert report.stats.rows_kept == 1
    assert report.stats.skipped == stats.skipped
    assert report.total_tokens == len(rows[0]["input_ids"])
