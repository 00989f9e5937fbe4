"""experiments/distill_prompts.py: the prompt set of the self-distillation run and its held-out split."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA, load_script


@pytest.fixture(scope="module")
def script():
    return load_script("experiments/distill_prompts.py")


@pytest.mark.skipif(not (SHARED_DATA / "mbpp" / "mbpp.jsonl").is_file(), reason="the shared GSM8K and MBPP files are missing")
def test_prompts_use_training_splits_only(script, tmp_path):
    out = tmp_path / "prompts.jsonl"

    assert script.main(["--out", str(out), "--data-dir", str(SHARED_DATA), "--gsm8k", "20"]) == 0

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [row["id"] for row in rows]
    mbpp_ids = [int(name.split("-")[1]) for name in ids if name.startswith("mbpp-")]
    assert len(ids) == len(set(ids)) == 20 + 464
    assert all(511 <= task_id <= 974 for task_id in mbpp_ids)
    assert ids[:20] != [f"gsm8k-train-{number}" for number in range(1, 21)]  # shuffled
    assert all(row["messages"][0]["role"] == "user" and row["messages"][0]["content"] for row in rows)
    with pytest.raises(SystemExit):
        script.main(["--out", str(out), "--data-dir", str(SHARED_DATA)])


def test_split_is_disjoint_seeded_and_complete(script, tmp_path):
    distilled = tmp_path / "distilled.jsonl"
    distilled.write_text("".join(json.dumps({"id": index}) + "\n" for index in range(50)))

    script.main(["--split", str(distilled), "--eval-fraction", "0.2", "--seed", "3"])

    train = [json.loads(line)["id"] for line in (tmp_path / "distilled_train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line)["id"] for line in (tmp_path / "distilled_eval.jsonl").read_text().splitlines()]
    assert len(held_out) == 10
    assert sorted(train + held_out) == list(range(50))
    assert train == sorted(train)
    assert held_out != list(range(10))
    with pytest.raises(SystemExit, match="exists"):
        script.main(["--split", str(distilled)])
