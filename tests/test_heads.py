"""Auxiliary heads on tiny models of every supported architecture: construction, wiring, loss, saving, loading."""

import copy

import pytest
import torch
from conftest import ARCHS, tiny_model

from caft.heads import (
    HeadsConfig,
    build_heads,
    find_decoder_layers,
    load_heads_state,
    read_heads_file,
    save_heads,
)
from caft.loss import IGNORE_INDEX, count_targets, head_targets, plain_head_loss
from caft.model import add_auxiliary_heads, make_unembed, remove_auxiliary_heads


def batch(vocab=128, seed=1):
    torch.manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_are_distinct_copies_of_last_layer(arch):
    model = tiny_model(arch)
    last = find_decoder_layers(model)[-1]
    add_auxiliary_heads(model, num_heads=3, num_layers=2)
    layers = [layer for head in model.caft_heads.heads for layer in head.layers]
    assert len(layers) == 6
    assert len({id(layer) for layer in layers}) == 6
    pointers = {p.data_ptr() for layer in layers for p in layer.parameters()}
    assert len(pointers) == 6 * len(list(last.parameters()))
    for layer in layers:
        assert type(layer) is type(last)
        assert sum(p.numel() for p in layer.parameters()) == sum(p.numel() for p in last.parameters())
        for (name, mine), (_, original) in zip(layer.state_dict().items(), last.state_dict().items()):
            assert torch.equal(mine, original), name


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_with_labels_matches_reference_losses(arch):
    model = tiny_model(arch).eval()  # no dropout, so two forward passes agree
    add_auxiliary_heads(model, num_heads=3)
    input_ids, attention_mask, labels = batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()

    # Sibling heads start as copies of the last layer fed with its own inputs, so at initialisation every
    # head's states equal the model's final states: head k's loss is the main logits scored against t+1+k.
    with torch.no_grad():
        remove = copy.deepcopy(model)
        remove_auxiliary_heads(remove)
        logits = remove(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    identity = lambda x: x  # noqa: E731
    for k in range(4):
        targets = head_targets(labels, k)
        expected = plain_head_loss(logits[:, : targets.shape[1]], targets, identity)
        got = out.head_stats[k, 0]
        assert torch.allclose(got, expected, rtol=1e-4), f"{arch} head {k}: {got} vs {expected}"
    assert out.head_stats[:, 1].long().tolist() == count_targets(labels, 3).tolist()
    assert out.logits.shape == (2, 4, 3)

    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, name


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_is_unchanged_by_heads(arch):
    model = tiny_model(arch).eval()
    plain = copy.deepcopy(model)
    add_auxiliary_heads(model, num_heads=2)
    input_ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=input_ids).logits, plain(input_ids=input_ids).logits)
    generated = model.generate(input_ids, max_new_tokens=4, do_sample=False)
    expected = plain.generate(input_ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected)


def test_linear_heads_start_as_main_head():
    model = tiny_model("llama")
    add_auxiliary_heads(model, num_heads=2, arch="linear")
    assert all(torch.all(head.layers[0].proj.weight == 0) for head in model.caft_heads.heads)
    input_ids, attention_mask, labels = batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    assert model.caft_heads.heads[0].layers[0].proj.weight.grad is not None


def test_separate_unembedding_copies_lm_head():
    model = tiny_model("llama")
    add_auxiliary_heads(model, num_heads=2, separate_unembed=True)
    for head in model.caft_heads.heads:
        assert torch.equal(head.lm_head.weight, model.lm_head.weight)
        assert head.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()


def test_separate_unembedding_reads_through_lora():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", tie_word_embeddings=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    lm_head = peft_model.base_model.model.lm_head
    effective = lm_head(torch.eye(32)).T  # (V, H): what the wrapped unembedding computes
    config = HeadsConfig(num_heads=1, separate_unembed=True)
    peft_model.base_model.model.lm_head.base_layer.weight.requires_grad_(False)
    heads = build_heads(peft_model.base_model.model, config)
    assert torch.allclose(heads.heads[0].lm_head.weight, effective, atol=1e-5)
    assert not torch.allclose(heads.heads[0].lm_head.weight, lm_head.base_layer.weight)


def test_reference_wiring_runs_on_final_normed_state():
    model = tiny_model("llama")
    add_auxiliary_heads(model, num_heads=2, wiring="reference")
    input_ids, attention_mask, labels = batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.isfinite(out.loss)
    # Reference wiring differs from sibling: the copied layer sees the normed state and no final norm follows.
    sibling = tiny_model("llama")
    add_auxiliary_heads(sibling, num_heads=2)
    reference_stats = out.head_stats[1:, 0]
    sibling_stats = sibling(input_ids=input_ids, attention_mask=attention_mask, labels=labels).head_stats[1:, 0]
    assert not torch.allclose(reference_stats, sibling_stats)


def test_heads_only_mode_trains_heads_not_trunk():
    model = tiny_model("llama")
    add_auxiliary_heads(model, num_heads=2)
    model.caft_state.mode = "heads_only"
    input_ids, attention_mask, labels = batch()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("caft_heads."):
            assert parameter.grad is not None, name
        elif "lm_head" not in name and "embed_tokens" not in name and "model.norm" not in name:
            # The trunk ran under no_grad; only the shared norm and unembedding sit after the heads.
            assert parameter.grad is None, name


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_model("llama")
    add_auxiliary_heads(model, num_heads=2)
    with torch.no_grad():
        for parameter in model.caft_heads.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    save_heads(model.caft_heads, tmp_path / "heads")
    config, state, source = read_heads_file(tmp_path / "heads")
    assert config.num_heads == 2 and config.hidden_size == 32 and config.vocab_size == 128
    assert all(key.startswith(("0.", "1.")) for key in state)

    fresh = tiny_model("llama")
    heads = build_heads(fresh, HeadsConfig.from_dict(config.__dict__))
    load_heads_state(heads, state, source)
    for (name, mine), (_, saved) in zip(heads.state_dict().items(), model.caft_heads.state_dict().items()):
        assert torch.equal(mine, saved), name


def test_original_heads_pth_loads_with_weights_only(tmp_path):
    model = tiny_model("llama")
    add_auxiliary_heads(model, num_heads=2, separate_unembed=True)
    # The original code saved a plain state dict with keys like 0.layers.0.self_attn.q_proj.weight.
    state = {key: value.clone() for key, value in model.caft_heads.heads.state_dict().items()}
    assert "0.layers.0.self_attn.q_proj.weight" in state and "0.lm_head.weight" in state
    torch.save(state, tmp_path / "heads.pth")
    config, loaded, _ = read_heads_file(tmp_path / "heads.pth")
    assert config is None
    fresh = tiny_model("llama")
    heads = build_heads(fresh, HeadsConfig(num_heads=2, separate_unembed=True))
    load_heads_state(heads, loaded, "heads.pth")
    assert torch.equal(heads.heads[1].lm_head.weight, model.caft_heads.heads[1].lm_head.weight)


def test_strict_loading_names_missing_unexpected_and_shapes():
    model = tiny_model("llama")
    heads = build_heads(model, HeadsConfig(num_heads=2))
    state = {key: value.clone() for key, value in heads.heads.state_dict().items()}
    broken = dict(state)
    del broken["1.layers.0.mlp.up_proj.weight"]
    broken["0.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        load_heads_state(heads, broken, "broken.pth")
    assert "1.layers.0.mlp.up_proj.weight" in str(error.value)
    assert "0.layers.0.extra.weight" in str(error.value)

    wrong_shape = dict(state)
    wrong_shape["0.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"q_proj.weight: file \(3, 3\)"):
        load_heads_state(heads, wrong_shape, "wrong.pth")


def test_hub_download_failure_names_repo_and_alternative(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"some-user/some-heads.*-hdir"):
        read_heads_file("some-user/some-heads")
