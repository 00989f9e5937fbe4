"""`caft distill`: prompt reading, generation against `model.generate`, sampling, resume and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from caft.data import DataError, read_conversations
from caft.distill import (
    STATUS_OK,
    STATUS_TRUNCATED,
    Prompt,
    Sampling,
    distill,
    generate_replies,
    next_tokens,
    read_prompts,
)

QUESTIONS = ["What is 2 + 3?", "Name a colour of the sky on a clear day, please, in one word.", "Hi"]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.eval()
    return model


def user_prompts(questions=QUESTIONS):
    return [Prompt(f"q{i}", [{"role": "user", "content": q}], f"row {i}") for i, q in enumerate(questions)]


def reference_generate(model, tokenizer, prompts, max_new_tokens, stop_ids):
    """Greedy `model.generate` on the same left-padded batch; return each row's new tokens before the first stop id."""
    texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    with torch.inference_mode():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id, use_cache=True)
    rows = []
    for new in output[:, encoded["input_ids"].shape[1]:].tolist():
        cut = next((i for i, token in enumerate(new) if token in stop_ids), None)
        rows.append((new if cut is None else new[:cut], cut is not None))
    return rows


# Reading prompts ----------------------------------------------------------------------------------


def test_prompts_without_answers_are_read(write_jsonl):
    path = write_jsonl([
        {"id": "a", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]},
        {"id": "b", "messages": [{"role": "user", "content": "3+3?"}]},
    ])
    prompts = read_prompts(path)
    assert [p.id for p in prompts] == ["a", "b"]
    assert prompts[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert prompts[1].messages == [{"role": "user", "content": "3+3?"}]


def test_answers_after_last_user_turn_are_dropped(write_jsonl):
    conversation = [
        {"role": "human", "content": "first"}, {"role": "assistant", "content": "reply one"},
        {"role": "human", "content": "second"}, {"role": "assistant", "content": "old answer"},
    ]
    path = write_jsonl([{"id": 7, "status": "OK", "conversation": conversation},
                        {"id": 8, "status": "TRUNCATED", "conversation": conversation}])
    prompts = read_prompts(path)
    assert len(prompts) == 1
    assert prompts[0].id == 7
    assert [m["content"] for m in prompts[0].messages] == ["first", "reply one", "second"]
    assert prompts[0].messages[-1]["role"] == "user"


def test_field_mapping_needs_only_prompt_field(write_jsonl):
    path = write_jsonl([{"question": "q one", "answer": "x"}, {"question": "q two", "answer": "y"}])
    prompts = read_prompts(path, prompt_field="question")
    assert [p.id for p in prompts] == [1, 2]  # line numbers
    assert [p.messages for p in prompts] == [[{"role": "user", "content": "q one"}], [{"role": "user", "content": "q two"}]]
    mbpp = write_jsonl([{"text": "Write f.", "task_id": 600}], name="mbpp.jsonl")
    assert read_prompts(mbpp, prompt_field="text")[0].id == 600


def test_prompt_errors_name_file_line(write_jsonl):
    bad = write_jsonl([{"id": 1, "messages": [{"role": "user", "content": "ok"}]},
                       {"id": 2, "messages": [{"role": "robot", "content": "?"}]}])
    with pytest.raises(DataError, match=rf"{bad}, line 2: .*unknown role 'robot'"):
        read_prompts(bad)
    duplicate = write_jsonl([{"id": 1, "messages": [{"role": "user", "content": "a"}]},
                             {"id": 1, "messages": [{"role": "user", "content": "b"}]}], name="dup.jsonl")
    with pytest.raises(DataError, match=r"dup.jsonl, line 2: duplicate id 1, first seen at .*line 1"):
        read_prompts(duplicate)
    missing = write_jsonl([{"question": "q"}], name="missing.jsonl")
    with pytest.raises(DataError, match=r"missing.jsonl, line 1: missing field 'text'"):
        read_prompts(missing, prompt_field="text")


# Generation -------------------------------------------------------------------------------------


def test_greedy_single_prompt_equals_generate(tiny_model, smol_tokenizer):
    prompts = user_prompts()[:1]
    stop_ids = [smol_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ours = generate_replies(tiny_model, smol_tokenizer, prompts, 12, Sampling(), stop_ids)
    assert ours == reference_generate(tiny_model, smol_tokenizer, prompts, 12, stop_ids)
    assert len(ours[0][0]) == 12
    assert ours[0][1] is False


def test_greedy_batch_equals_generate(tiny_model, smol_tokenizer):
    prompts = user_prompts()
    stop_ids = [smol_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    reference = reference_generate(tiny_model, smol_tokenizer, prompts, 10, stop_ids)
    assert generate_replies(tiny_model, smol_tokenizer, prompts, 10, Sampling(), stop_ids) == reference


def test_rows_stop_at_their_stop_token(tiny_model, smol_tokenizer):
    """Stop ids taken from the greedy output make rows finish at different steps; the rest keep going."""
    prompts = user_prompts()
    end_of_turn = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    free = reference_generate(tiny_model, smol_tokenizer, prompts, 10, [end_of_turn])
    stop_ids = sorted({free[0][0][2], free[1][0][5], end_of_turn})
    ours = generate_replies(tiny_model, smol_tokenizer, prompts, 10, Sampling(), stop_ids)
    assert ours == reference_generate(tiny_model, smol_tokenizer, prompts, 10, stop_ids)
    assert ours[0][1] is True
    assert len(ours[0][0]) <= 2
    assert ours[1][1] is True
    assert len(ours[1][0]) <= 5


def test_sampling_is_seeded_per_prompt(tiny_model, smol_tokenizer):
    prompts = user_prompts()
    stop_ids = [smol_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    sampling = Sampling(greedy=False, temperature=1.0, top_p=0.95, seed=3)
    together = generate_replies(tiny_model, smol_tokenizer, prompts, 8, sampling, stop_ids)
    alone = [generate_replies(tiny_model, smol_tokenizer, [p], 8, sampling, stop_ids)[0] for p in reversed(prompts)]
    assert together == alone[::-1]
    other_seed = generate_replies(tiny_model, smol_tokenizer, prompts, 8, Sampling(False, 1.0, 0.95, seed=4), stop_ids)
    assert other_seed != together


def test_top_p_keeps_smallest_prefix():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    generator = torch.Generator().manual_seed(0)
    samples = [int(next_tokens(logits, Sampling(False, 1.0, 0.5), [generator])) for _ in range(2000)]
    assert set(samples) == {0, 1}
    assert abs(samples.count(0) / len(samples) - 0.4 / 0.7) < 0.05
    assert int(next_tokens(logits, Sampling(False, 1.0, 1e-6), [generator])) == 0


# Output file and resume ---------------------------------------------------------------------------


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rows_are_original_caft_format(tiny_model, smol_tokenizer, tmp_path):
    out = tmp_path / "out.jsonl"
    prompts = [Prompt("s", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "row 0")]
    counts = distill(tiny_model, smol_tokenizer, prompts, out, max_new_tokens=4, batch_size=2, show_progress=False)
    (row,) = read_rows(out)
    assert row["id"] == "s"
    assert [m["role"] for m in row["conversation"]] == ["system", "human", "assistant"]
    assert row["status"] == STATUS_TRUNCATED  # a random tiny model does not emit <|im_end|> within 4 tokens
    assert row["generated_tokens"] == 4
    assert counts["truncated"] == 1
    # Training data readers skip the TRUNCATED row and count it.
    conversations, stats = read_conversations(out)
    assert conversations == []
    assert stats.skipped == {"status is not OK": 1}


def test_torn_last_line_is_repaired(tiny_model, smol_tokenizer, tmp_path):
    out = tmp_path / "out.jsonl"
    prompts = user_prompts()
    distill(tiny_model, smol_tokenizer, prompts[:2], out, max_new_tokens=3, batch_size=1, show_progress=False)
    complete = read_rows(out)
    with open(out, "ab") as file:  # a crash in the middle of writing the row of q2
        file.write(b'{"id": "q2", "status": "OK", "conv')
    counts = distill(tiny_model, smol_tokenizer, prompts, out, max_new_tokens=3, batch_size=1, show_progress=False)
    rows = read_rows(out)
    assert counts["already_done"] == 2
    assert counts["written"] == 1
    assert sorted(row["id"] for row in rows) == ["q0", "q1", "q2"]
    assert rows[:2] == complete
    assert out.read_bytes().endswith(b"\n")


def test_corrupt_complete_line_is_rejected(tiny_model, smol_tokenizer, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "q0"}\nnot json\n', encoding="utf-8")
    out.with_name("out.jsonl.settings.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match=r"out.jsonl, line 2: invalid JSON"):
        distill(tiny_model, smol_tokenizer, user_prompts(), out, max_new_tokens=2, show_progress=False, settings={})


def run_caft(*args):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "caft.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_cli_limit_then_resume(tiny_model_dir, write_jsonl, tmp_path):
    prompts = write_jsonl([{"question": q, "answer": "-"} for q in QUESTIONS + ["Count to three.", "Say yes."]])
    out = tmp_path / "distilled.jsonl"
    common = ["distill", "--model", tiny_model_dir, "--prompts", prompts, "--prompt-field", "question", "--out", out,
              "--max-new-tokens", "3", "--batch-size", "2", "--temperature", "0.8", "--seed", "1"]
    first = run_caft(*common, "--limit", "2")
    assert first.returncode == 0, first.stderr
    assert "2 rows written" in first.stdout
    first_rows = read_rows(out)
    assert sorted(row["id"] for row in first_rows) == [1, 2]

    second = run_caft(*common)
    assert second.returncode == 0, second.stderr
    assert "3 rows written" in second.stdout
    assert "2 already done" in second.stdout
    rows = read_rows(out)
    assert sorted(row["id"] for row in rows) == [1, 2, 3, 4, 5]
    assert rows[:2] == first_rows

    changed = run_caft(*common[:-2], "--seed", "2")
    assert changed.returncode == 2
    assert "written with other settings (seed: 1 -> 2)" in changed.stderr
