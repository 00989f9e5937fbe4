"""`caft export`: the merged model loads with plain transformers, with no stray keys, and equals the adapter model.

Runs are real `run_train` runs (2 steps at a high learning rate, so the adapter moves the logits) of a
tiny Llama with SmolLM2's tokenizer, with tied and untied embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import caft.export
from caft.cli import main as cli_main
from caft.config import TrainConfig
from caft.export import export_model
from caft.heads import build_heads, load_heads_state, read_heads_file
from caft.train import run_train

LOGITS_TOLERANCE = 1e-5


def train_run(model_dir: Path, train_file: Path, out_dir: Path, **overrides) -> Path:
    values = dict(
        model_name_or_path=str(model_dir), train_set=str(train_file), prompt_field="question", response_field="answer",
        size=8, model_max_length=128, per_device_batch_size=4, max_steps=2, learning_rate=5e-2, lora_r=4,
        caft_num_heads=2, finetune_heads=True, logging_steps=1, output_dir=str(out_dir), eval_before_training=False,
    )
    values.update(overrides)
    run_train(TrainConfig(**values))
    return out_dir


def fixed_batch() -> dict[str, torch.Tensor]:
    """Two rows of different lengths, right-padded."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 49152, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits_of(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**fixed_batch()).logits


def adapter_model(run_dir: Path, base_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(run_dir))


def load_plainly(folder: Path):
    """Load with plain transformers and check the loading report is clean."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{folder}: {kind} {info[kind]}"
    return model


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, smol_tokenizer):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny-llama-untied")
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["tied", "untied"])
def lora_run(request, tmp_path_factory, tiny_model_dir, untied_model_dir, gsm8k_files):
    """A LoRA run with trained heads and the -save-combined merged model; returns (run folder, base folder)."""
    base_dir = tiny_model_dir if request.param == "tied" else untied_model_dir
    run_dir = tmp_path_factory.mktemp(f"lora-{request.param}") / "run"
    train_run(base_dir, gsm8k_files[0], run_dir, caft_save_combined_model=True)
    return run_dir, base_dir


def test_adapter_loads_without_pattern_warnings(lora_run):
    """The saved adapter has no head weights, so its config names no head patterns that a plain base cannot match."""
    import warnings

    run_dir, base_dir = lora_run
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert not any("caft_heads" in pattern for pattern in config["rank_pattern"])
    assert not any("caft_heads" in pattern for pattern in config["alpha_pattern"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter_model(run_dir, base_dir)
    assert not [str(warning.message) for warning in caught if "pattern" in str(warning.message)]


def test_export_loads_plainly_and_equals_adapter_model(tmp_path, lora_run):
    run_dir, base_dir = lora_run
    out = export_model(run_dir, tmp_path / "export")
    exported = load_plainly(out)

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert exported.config.tie_word_embeddings == base.config.tie_word_embeddings
    assert exported.config.use_cache is True
    assert not [key for key in load_file(str(out / "model.safetensors")) if "caft" in key or "lora" in key]

    expected = logits_of(adapter_model(run_dir, base_dir))
    assert (expected - logits_of(base)).abs().max() > 1e-3, "the adapter did not move the logits; the test proves nothing"
    assert torch.allclose(logits_of(exported), expected, atol=LOGITS_TOLERANCE)
    # The merged model written at the end of the run (-save-combined) is the same model.
    assert torch.allclose(logits_of(load_plainly(run_dir / "merged")), expected, atol=LOGITS_TOLERANCE)


def test_export_writes_heads_as_their_own_folder(tmp_path, lora_run):
    run_dir, _base_dir = lora_run
    out = export_model(run_dir, tmp_path / "export")
    config, weights, source = read_heads_file(out / "heads")
    assert config is not None and config.num_heads == 2
    assert not [key for key in weights if "lora" in key]  # -ft-heads adapters are merged into the heads' weights
    heads = build_heads(load_plainly(out), config)
    load_heads_state(heads, weights, source)  # strict: raises on any missing or unexpected key
    trained = load_file(str(run_dir / "heads" / "model.safetensors"))
    assert all(torch.equal(trained[key], weights[key]) for key in trained)


def test_export_bfloat16_merges_in_float32(tmp_path, lora_run):
    run_dir, _base_dir = lora_run
    full = load_file(str(export_model(run_dir, tmp_path / "f32") / "model.safetensors"))
    half = load_file(str(export_model(run_dir, tmp_path / "bf16", dtype="bfloat16") / "model.safetensors"))
    assert half.keys() == full.keys()
    for key, tensor in full.items():
        assert half[key].dtype == torch.bfloat16
        assert torch.equal(half[key], tensor.to(torch.bfloat16)), key  # one rounding, after a float32 merge


def test_export_unties_embeddings_adapted_by_lora(tmp_path, tiny_model_dir, gsm8k_files):
    """LoRA on a tied lm_head: merging into the shared matrix would change the input embedding too."""
    run_dir = train_run(tiny_model_dir, gsm8k_files[0], tmp_path / "run", lora_target_modules=["q_proj", "lm_head"])
    assert json.loads((tiny_model_dir / "config.json").read_text()).get("tie_word_embeddings", True)
    exported = load_plainly(export_model(run_dir, tmp_path / "export"))
    assert exported.config.tie_word_embeddings is False
    assert exported.lm_head.weight.data_ptr() != exported.model.embed_tokens.weight.data_ptr()
    expected = logits_of(adapter_model(run_dir, tiny_model_dir))
    assert torch.allclose(logits_of(exported), expected, atol=LOGITS_TOLERANCE)


def test_export_full_finetuning_run(tmp_path, tiny_model_dir, gsm8k_files):
    run_dir = train_run(tiny_model_dir, gsm8k_files[0], tmp_path / "run", finetune_method="sft", learning_rate=1e-3)
    out = export_model(run_dir, tmp_path / "export")
    exported = load_plainly(out)
    assert (out / "tokenizer_config.json").is_file() and (out / "heads" / "model.safetensors").is_file()
    reference = AutoModelForCausalLM.from_pretrained(run_dir)
    assert torch.allclose(logits_of(exported), logits_of(reference), atol=LOGITS_TOLERANCE)


def test_export_rejects_nonempty_output_and_foreign_folders(tmp_path, lora_run):
    run_dir, _base_dir = lora_run
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_model(run_dir, tmp_path / "taken")
    with pytest.raises(FileNotFoundError, match="contains neither adapter_config.json nor config.json"):
        export_model(tmp_path / "taken", tmp_path / "out")


class LocalHub:
    """Stands in for huggingface_hub.HfApi: writes uploads to `<root>/<repo_id>/` and records the calls."""

    def __init__(self, root: Path):
        self.root, self.created = root, {}

    def create_repo(self, repo_id, repo_type="model", private=False, exist_ok=False):
        self.created[repo_id] = {"repo_type": repo_type, "private": private}

    def upload_folder(self, repo_id, folder_path, repo_type="model", ignore_patterns=None, commit_message=None):
        from fnmatch import fnmatch

        assert repo_id in self.created, "upload before create_repo"
        source = Path(folder_path)
        for path in source.rglob("*"):
            relative = path.relative_to(source).as_posix()
            if path.is_file() and not any(fnmatch(relative, pattern) for pattern in ignore_patterns or []):
                target = self.root / repo_id / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())


def test_cli_export_push_to_hub_uploads_model_and_heads_separately(tmp_path, monkeypatch, lora_run):
    run_dir, base_dir = lora_run
    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(caft.export, "_hub_api", lambda: hub)
    code = cli_main([
        "export", str(run_dir), "--out", str(tmp_path / "export"),
        "--push-to-hub", "me/tiny-caft", "--push-heads-to-hub", "me/tiny-caft-heads", "--private",
    ])
    assert code == 0
    assert hub.created == {
        "me/tiny-caft": {"repo_type": "model", "private": True},
        "me/tiny-caft-heads": {"repo_type": "model", "private": True},
    }
    model_repo, heads_repo = tmp_path / "hub" / "me" / "tiny-caft", tmp_path / "hub" / "me" / "tiny-caft-heads"
    assert not (model_repo / "heads").exists()
    assert (model_repo / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in heads_repo.iterdir()) == ["config.json", "model.safetensors"]
    expected = logits_of(adapter_model(run_dir, base_dir))
    assert torch.allclose(logits_of(load_plainly(model_repo)), expected, atol=LOGITS_TOLERANCE)
    read_heads_file(heads_repo)


def test_cli_export_heads_push_needs_model_push(tmp_path, monkeypatch, lora_run, capsys):
    run_dir, _base_dir = lora_run
    monkeypatch.setattr(caft.export, "_hub_api", lambda: pytest.fail("no upload expected"))
    code = cli_main(["export", str(run_dir), "--out", str(tmp_path / "export"), "--push-heads-to-hub", "me/heads"])
    assert code == 2
    assert "--push-heads-to-hub needs --push-to-hub" in capsys.readouterr().err
