"""Shared pytest fixtures."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template), loaded once per session; do not mutate it."""
    from transformers import AutoTokenizer

    from caft.assets import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture
def tokenizer_copy(smol_tokenizer):
    """A private copy of the SmolLM2 tokenizer for tests that change tokens or templates."""
    return copy.deepcopy(smol_tokenizer)


@pytest.fixture
def write_jsonl(tmp_path):
    """Return a function that writes rows (objects, or raw `str` lines) to a `.jsonl` file in tmp_path."""

    def write(rows: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write
