"""Shared pytest fixtures."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from caft.assets import shared_data_dir

SHARED_DATA = shared_data_dir()
REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """Import a script of the repository (for example experiments/caft_vs_ntp.py) as a module."""
    import importlib.util

    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def tiny_config(arch: str = "llama", vocab_size: int = 128, **overrides):
    """A 2-layer config of the given architecture, small enough for CPU tests."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "mistral":
        config = MistralConfig(**common)
    elif arch == "gemma3":
        config = Gemma3TextConfig(**common, head_dim=8, sliding_window=4, final_logit_softcapping=30.0)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                            bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model.config.use_cache = False
    return model


ARCHS = ("llama", "qwen2", "mistral", "gemma3", "gpt2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny Llama saved with SmolLM2's real tokenizer and chat template, for CLI and Trainer runs."""
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gsm8k_files(tmp_path_factory):
    """Small train and held-out GSM8K files cut from the real data set."""
    source = SHARED_DATA / "gsm8k"
    out = tmp_path_factory.mktemp("gsm8k")
    for name, count in (("train.jsonl", 16), ("test.jsonl", 8)):
        lines = (source / name).read_text().splitlines()[:count]
        (out / name).write_text("\n".join(lines) + "\n")
    return out / "train.jsonl", out / "test.jsonl"
