"""Self-speculative decoding: greedy output equals `model.generate`, head caches equal the training-time heads,
sampling keeps the model's distribution, and `caft generate` runs end to end."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from caft.cli import main as cli_main
from caft.draft_tree import DEFAULT_TREE_SIZE, FALLBACK_RANK_ACCURACY, DraftTree
from caft.generate import (
    DEFAULT_DRAFT_VOCAB,
    HeadDrafter,
    _LastLayerCapture,
    _TokenChooser,
    _verify,
    crop_cache,
    encode_prompt,
    load_heads_for,
    prepacked_linears,
    record_past_after_prefill,
    speculative_generate,
    SpeculativeStats,
    drafting_support,
)
from caft.grouped_attention import NAME as GROUPED_ATTENTION
from caft.grouped_attention import grouped_attention_in_kernel
from caft.heads import HeadsConfig, build_heads, find_decoder, save_heads
from caft.lookup import DEFAULT_LOOKUP_TOKENS
from caft.model import add_auxiliary_heads, make_unembed, run_heads

HEAD_VARIANTS = {
    "transformer-sibling": dict(arch="transformer", wiring="sibling", num_layers=1),
    "transformer-reference-2-layers": dict(arch="transformer", wiring="reference", num_layers=2),
    "transformer-own-unembedding": dict(arch="transformer", wiring="sibling", num_layers=1, separate_unembed=True),
    "linear": dict(arch="linear", wiring="sibling", num_layers=1),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads on a busy shared CPU make them many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SLIDING_WINDOW = 4
SLIDING_WINDOW_KINDS = ("gemma3", "mistral")  # every gemma3 layer of 2 is sliding; mistral slides with the window set


def tiny_model(kind: str, vocab_size: int = 64, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None)
    settings.update(overrides)
    if kind == "llama":
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, **settings,
        )
        return LlamaForCausalLM(config).eval()
    if kind in SLIDING_WINDOW_KINDS:
        config = tiny_config(kind, **settings, sliding_window=SLIDING_WINDOW)
        return AutoModelForCausalLM.from_config(config).eval()
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **settings)
    return GPT2LMHeadModel(config).eval()


def random_heads(model, num_heads: int = 3, seed: int = 0, noise: float = 0.05, **variant):
    """Heads built from the model, with every weight perturbed so no head copies another or the model."""
    torch.manual_seed(seed)
    heads = build_heads(model, HeadsConfig(num_heads=num_heads, **variant))
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.add_(torch.randn_like(parameter) * noise)
    return heads.eval()


def greedy_reference(model, prompt: torch.Tensor, max_new_tokens: int, eos_token_id=None) -> list[int]:
    output = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=0,
    )
    return output[0, prompt.shape[1]:].tolist()


# Greedy decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(HEAD_VARIANTS))
@pytest.mark.parametrize("head_cache", [True, False], ids=["head-cache", "recompute"])
def test_greedy_equals_generate(kind, variant, head_cache):
    model = tiny_model(kind)
    heads = random_heads(model, **HEAD_VARIANTS[variant])
    prompt = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    expected = greedy_reference(model, prompt, 24)

    result = speculative_generate(model, heads, prompt, max_new_tokens=24, eos_token_id=[], head_cache=head_cache)

    assert result.tokens == expected
    assert result.stats.new_tokens == 24
    assert result.stats.reached[0] == result.stats.steps


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_prepacked_linears_match_default():
    """oneDNN prepacked linears give the same logits up to float32 rounding, the same greedy tokens, and are undone on exit."""
    model = tiny_model("llama", vocab_size=128)
    heads = random_heads(model, **HEAD_VARIANTS["transformer-sibling"])
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(prompt).logits
    expected = greedy_reference(model, prompt, 20)
    linears = [layer for layer in [*model.modules(), *heads.modules()] if type(layer) is torch.nn.Linear]

    with prepacked_linears(model, heads) as count:
        assert count == len(linears) > 0
        with torch.no_grad():
            packed_logits = model(prompt).logits
        result = speculative_generate(model, heads, prompt, max_new_tokens=20, eos_token_id=[])

    torch.testing.assert_close(packed_logits, logits, rtol=1e-4, atol=1e-4)
    assert result.tokens == expected
    assert all("forward" not in layer.__dict__ for layer in linears)
    assert not any(hasattr(layer, "_caft_packed_weight") for layer in linears)


def test_prepacked_linears_skip_other_dtypes():
    model = tiny_model("llama").to(torch.bfloat16)
    with prepacked_linears(model) as count:
        assert count == 0


def test_tree_verification_copies_no_grouped_cache(monkeypatch):
    """Verification blocks carry a mask, and on CPU their cached keys and values are not copied per query head."""
    from transformers.integrations import sdpa_attention

    copies = []
    original = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda hidden, n_rep: copies.append(n_rep) or original(hidden, n_rep))
    model = tiny_model("llama", vocab_size=128)  # 4 query heads over 2 key/value heads
    heads = random_heads(model, **HEAD_VARIANTS["transformer-sibling"])
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    expected = greedy_reference(model, prompt, 30)
    padded = torch.ones_like(prompt)
    padded[0, 0] = 0
    with torch.no_grad():  # the check can fail: a masked block outside the switch copies
        model(prompt, attention_mask=padded)
    assert copies
    copies.clear()

    tree = DraftTree.from_rank_accuracy(FALLBACK_RANK_ACCURACY, DEFAULT_TREE_SIZE, 3)
    result = speculative_generate(model, heads, prompt, max_new_tokens=30, eos_token_id=[], tree=tree, lookup_tokens=4)

    assert result.tokens == expected
    assert result.stats.steps > 0
    assert copies == []
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_grouped_attention_equals_sdpa(kind):
    """Masked blocks, a causal prefill and one-token steps give sdpa's outputs; configs come back after an error."""
    model = tiny_model(kind, vocab_size=128)
    heads = random_heads(model, **HEAD_VARIANTS["transformer-sibling"])
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    padded = torch.ones_like(prompt)
    padded[0, :3] = 0

    def outputs():
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            prefill = model(prompt[:, :8], cache=cache, use_cache=True).logits
            block = model(prompt[:, 8:], cache=cache, use_cache=True).logits  # 4 queries after 8 cached keys
            step = model(prompt[:, :1], cache=cache, use_cache=True).logits
            return prefill, block, step, model(prompt, attention_mask=padded).logits

    expected = outputs()
    with grouped_attention_in_kernel(model, heads) as switched:
        assert switched == 1 + len(heads)  # the model's config and one copy per head
        assert model.config._attn_implementation == GROUPED_ATTENTION
        for got, want in zip(outputs(), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert model.config._attn_implementation == "sdpa"

    with pytest.raises(RuntimeError, match="inside"), grouped_attention_in_kernel(model):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
    other = tiny_model(kind, vocab_size=128)
    with grouped_attention_in_kernel(model):
        assert other.config._attn_implementation == "sdpa"  # other models keep their attention


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(num_draft=0),
        dict(tree=DraftTree.from_rank_accuracy(FALLBACK_RANK_ACCURACY, DEFAULT_TREE_SIZE, 3), lookup_tokens=4),
        dict(temperature=0.8, seed=3),
        dict(temperature=0.8, seed=3, num_draft=0),
    ],
    ids=["greedy-chain", "greedy-no-drafts", "greedy-tree-lookup", "sampling-chain", "sampling-no-drafts"],
)
def test_streamed_tokens_in_order(options):
    """The groups passed to on_tokens, joined, are the generated tokens in order, with no token missing or repeated."""
    model = tiny_model("llama", seed=3)
    heads = random_heads(model, **HEAD_VARIANTS["transformer-sibling"])
    prompt = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    streamed = []

    result = speculative_generate(
        model, heads, prompt, max_new_tokens=40, eos_token_id=[], on_tokens=streamed.extend, **options
    )

    assert streamed == result.tokens
    assert len(result.tokens) == 40
    if options.get("temperature", 0) == 0:
        assert result.tokens == greedy_reference(model, prompt, 40)


def test_greedy_exercises_accept_and_reject():
    """A tiny llama whose output falls into a loop: some drafts are accepted and some rejected, output unchanged."""
    model = tiny_model("llama", seed=3)
    torch.manual_seed(3)
    heads = build_heads(model, HeadsConfig(num_heads=3)).eval()
    prompt = torch.randint(0, 64, (1, 7))
    expected = greedy_reference(model, prompt, 40)

    result = speculative_generate(model, heads, prompt, max_new_tokens=40, eos_token_id=[])

    assert result.tokens == expected
    assert 0 < result.stats.accepted[0] < result.stats.reached[0]
    assert result.stats.forwards < 40
    assert result.stats.tokens_per_forward == pytest.approx(40 / result.stats.forwards)


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 3, 5, 11])
def test_greedy_max_new_tokens(max_new_tokens):
    model = tiny_model("gpt2")
    heads = random_heads(model)
    prompt = torch.tensor([[5, 9, 2, 33]])
    expected = greedy_reference(model, prompt, 11)[:max_new_tokens]

    result = speculative_generate(model, heads, prompt, max_new_tokens=max_new_tokens, eos_token_id=[])

    assert result.tokens == expected


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_stops_at_eos(kind):
    model = tiny_model(kind, seed=3)
    heads = random_heads(model)
    prompt = torch.tensor([[3, 14, 15, 9, 26]])
    free_run = greedy_reference(model, prompt, 30)
    eos = free_run[6]  # a token the model produces, so generation must stop at its first occurrence
    expected = greedy_reference(model, prompt, 30, eos_token_id=eos)

    result = speculative_generate(model, heads, prompt, max_new_tokens=30, eos_token_id=eos)

    assert result.tokens == expected
    assert result.tokens[-1] == eos
    assert eos not in result.tokens[:-1]


def test_num_draft_zero_is_plain_decoding():
    model = tiny_model("llama")
    heads = random_heads(model)
    prompt = torch.tensor([[1, 2, 3]])

    result = speculative_generate(model, heads, prompt, max_new_tokens=12, num_draft=0, eos_token_id=[])

    assert result.tokens == greedy_reference(model, prompt, 12)
    assert result.stats.forwards == 12
    assert result.stats.reached == []


@pytest.mark.parametrize("kind", SLIDING_WINDOW_KINDS)
@pytest.mark.parametrize("head_cache", [True, False], ids=["head-cache", "recompute"])
def test_sliding_window_greedy_equals_generate(kind, head_cache):
    """Chain drafting crops sliding-window caches that have filled their window, and the output stays exact."""
    model = tiny_model(kind, seed=2)  # its greedy output repeats, so copies of the last layer draft some tokens right
    heads = build_heads(model, HeadsConfig(num_heads=3)).eval()
    prompt = torch.randint(0, 64, (1, 3 * SLIDING_WINDOW), generator=torch.Generator().manual_seed(1))
    expected = greedy_reference(model, prompt, 40)

    result = speculative_generate(model, heads, prompt, max_new_tokens=40, eos_token_id=[], head_cache=head_cache)

    assert drafting_support(model) == "chain"
    assert result.tokens == expected
    assert 0 < result.stats.accepted[0] < result.stats.reached[0]


def test_linear_attention_layers_rejected():
    """A hybrid model whose linear-attention cache cannot be cropped gets a clear error, not a crash mid-generation."""
    import transformers

    config = transformers.Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=0, layer_types=["linear_attention", "full_attention"],
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    heads = random_heads(model)

    with pytest.raises(ValueError, match="LinearAttentionLayer"):
        speculative_generate(model, heads, [1, 2, 3], max_new_tokens=4, tree=None)


def test_sliding_window_rejects_tree():
    model = tiny_model("gemma3")
    heads = random_heads(model)

    with pytest.raises(ValueError, match="Use chain drafting without prompt lookup"):
        speculative_generate(model, heads, [1, 2, 3], max_new_tokens=4, tree=DraftTree.chain(2))


# Head caches against the training-time heads ----------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("variant", list(HEAD_VARIANTS))
@pytest.mark.parametrize("head_cache", [True, False], ids=["head-cache", "recompute"])
def test_draft_logits_equal_run_heads(kind, variant, head_cache):
    """Blocks with cropped rejections give the logits that caft.model.run_heads gives on the whole sequence."""
    model = tiny_model(kind)
    heads = random_heads(model, **HEAD_VARIANTS[variant])
    prompt = torch.tensor([[4, 8, 15, 16, 23, 42]])
    blocks = [([7, 1, 9, 30], 1), ([2, 5, 61], 2), ([11, 12], 0)]  # (block tokens, index of the last kept token)

    cache = DynamicCache(config=model.config)
    kept = prompt[0].tolist()
    with torch.no_grad(), _LastLayerCapture(model) as capture:
        drafter = HeadDrafter(model, heads, num_draft=len(heads), use_cache=head_cache)
        model(input_ids=prompt, cache=cache, use_cache=True)
        record_past_after_prefill(cache)  # the prompt already fills gemma3's window of 4
        drafter.draft_logits(capture, -1)
        for tokens, last_kept in blocks:
            model(input_ids=torch.tensor([tokens]), cache=cache, use_cache=True)
            crop_cache(cache, len(tokens) - 1 - last_kept)
            logits = drafter.draft_logits(capture, last_kept)
            kept += tokens[: last_kept + 1]
    assert cache.get_seq_length() == len(kept)

    reference_model = add_auxiliary_heads(copy.deepcopy(model), heads=copy.deepcopy(heads))
    with torch.no_grad():
        reference_model._caft_capture.active = True
        # use_cache=False as in caft_forward: GPT-2 passes its cache positionally and run_heads would write into it.
        final_hidden = find_decoder(reference_model)(input_ids=torch.tensor([kept]), use_cache=False).last_hidden_state
        expected = [
            make_unembed(reference_model, own_head)(hidden[:, -1])[0] for hidden, own_head in run_heads(reference_model, final_hidden)
        ]
        reference_model._caft_capture.clear()
    for k, (actual, wanted) in enumerate(zip(logits, expected), start=1):
        torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=1e-5, msg=lambda message, k=k: f"head {k}: {message}")


# Sampling ----------------------------------------------------------------------------------------


def chi_square_critical(degrees: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.09 is the 0.999 normal quantile."""
    term = 2.0 / (9.0 * degrees)
    return degrees * (1.0 - term + z * math.sqrt(term)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, with cells of expected count < 5 pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return statistic, int(keep.sum()) - 1


def test_acceptance_rule_keeps_model_distribution():
    """Drafts from q checked against p: the first token follows p0, the second (after an accepted first) p1."""
    generator = torch.Generator().manual_seed(0)
    vocab = 8
    model_logits = torch.randn(3, vocab, generator=generator) * 1.5  # rows: p0, p1, p2
    head_logits = torch.randn(2, vocab, generator=generator) * 1.5  # q1, q2
    chooser = _TokenChooser(1.0, torch.Generator().manual_seed(1))
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    stats = SpeculativeStats(reached=[0, 0], accepted=[0, 0])
    for _ in range(8000):
        drafts = [chooser.choose(logits) for logits in head_logits]
        accepted, next_token = _verify(chooser, drafts, model_logits, head_logits, stats)
        tokens = drafts[:accepted] + [next_token]
        first[tokens[0]] += 1
        if accepted >= 1:
            second[tokens[1]] += 1

    p0, p1 = torch.softmax(model_logits[0], -1), torch.softmax(model_logits[1], -1)
    q1 = torch.softmax(head_logits[0], -1)
    for name, counts, probs in (("first token", first, p0), ("second token", second, p1)):
        statistic, degrees = chi_square(counts, probs)
        assert statistic < chi_square_critical(degrees), f"{name}: chi-square {statistic:.1f} with {degrees} df"
    # The test has power: always accepting the draft would give q1, far outside the tolerance.
    assert chi_square(first, q1)[0] > 10 * chi_square_critical(vocab - 1)
    assert 0 < stats.accepted[0] < stats.reached[0]


@pytest.mark.parametrize("draft_vocab", [None, 4], ids=["whole-vocab", "draft-vocab"])
def test_sampling_matches_model_distribution(draft_vocab):
    """End to end on a tiny model: the first two sampled tokens follow the model's exact joint distribution.

    With a draft vocabulary of 4 of the 6 tokens, the heads never draft tokens 4 and 5; the
    acceptance rule must still give them their probability.
    """
    vocab = 6
    model = tiny_model("llama", vocab_size=vocab, initializer_range=0.3)
    heads = random_heads(model, num_heads=2, noise=0.2)
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        first = torch.softmax(model(prompt).logits[0, -1], -1)
        joint = torch.stack([
            first[a] * torch.softmax(model(torch.cat([prompt, torch.tensor([[a]])], 1)).logits[0, -1], -1)
            for a in range(vocab)
        ])  # joint[a, b] = p(x1 = a) p(x2 = b | x1 = a)

    counts = torch.zeros(vocab, vocab)
    accepted = reached = 0
    for seed in range(500):
        result = speculative_generate(
            model, heads, prompt, max_new_tokens=2, temperature=1.0, seed=seed, eos_token_id=[], draft_vocab=draft_vocab
        )
        counts[result.tokens[0], result.tokens[1]] += 1
        accepted += result.stats.accepted[0]
        reached += result.stats.reached[0]

    statistic, degrees = chi_square(counts.flatten(), joint.flatten())
    assert statistic < chi_square_critical(degrees), f"chi-square {statistic:.1f} with {degrees} df"
    assert 0 < accepted < reached


def test_sampling_is_seeded():
    model = tiny_model("llama", initializer_range=0.3)
    heads = random_heads(model)
    prompt = torch.tensor([[1, 2, 3]])
    runs = [
        speculative_generate(model, heads, prompt, max_new_tokens=15, temperature=0.8, seed=seed, eos_token_id=[]).tokens
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# Draft vocabulary --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", ["transformer-sibling", "transformer-own-unembedding"])
def test_draft_vocab_keeps_greedy_output(kind, variant):
    """Heads limited to token ids below 20 draft only those; their logits there are the full ones; the output is unchanged."""
    model = tiny_model(kind, seed=3)
    heads = random_heads(model, **HEAD_VARIANTS[variant])
    prompt = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    expected = greedy_reference(model, prompt, 30)
    recorded = []
    original = HeadDrafter._unembed

    def recording(self, hidden_states):
        logits = original(self, hidden_states)
        self.draft_vocab, full = None, original(self, hidden_states)
        self.draft_vocab = 20
        recorded.append((logits, full))
        return logits

    HeadDrafter._unembed = recording
    try:
        limited = speculative_generate(model, heads, prompt, max_new_tokens=30, eos_token_id=[], draft_vocab=20)
    finally:
        HeadDrafter._unembed = original

    assert limited.tokens == expected
    assert recorded
    for logits, full in recorded:
        for row, full_row in zip(logits, full):
            assert torch.isneginf(row[20:]).all()
            torch.testing.assert_close(row[:20], full_row[:20], atol=1e-5, rtol=1e-5)
    # A draft vocabulary as large as the vocabulary is the whole vocabulary.
    whole = speculative_generate(model, heads, prompt, max_new_tokens=30, eos_token_id=[], draft_vocab=64)
    assert whole.tokens == expected


def test_draft_vocab_logits_with_bias_and_softcap():
    """The sliced unembedding keeps the bias and the logit softcapping of the full one."""
    from caft.loss import Unembedding

    model = tiny_model("llama")
    drafter = HeadDrafter(model, random_heads(model), num_draft=2, draft_vocab=20)
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 64, bias=True)
    torch.nn.init.normal_(linear.bias, std=3.0)
    hidden = torch.randn(1, 2, 32) * 4
    for softcap in (None, 2.0):
        unembed = Unembedding(linear, softcap)
        with torch.no_grad():
            limited, full = drafter._logits_in_draft_vocab(unembed, hidden), unembed(hidden)
        torch.testing.assert_close(limited[..., :20], full[..., :20])
        assert torch.isneginf(limited[..., 20:]).all()


# Input checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long)), "one non-empty prompt"),
        (dict(input_ids=torch.ones(1, 0, dtype=torch.long)), "one non-empty prompt"),
        (dict(num_draft=4), "num_draft must be between 0 and the number of heads"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(max_new_tokens=-1), "max_new_tokens must be"),
        (dict(draft_vocab=-1), "draft_vocab must be >= 0"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    model = tiny_model("llama")
    heads = random_heads(model)
    arguments = dict(input_ids=torch.tensor([[1, 2]]))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        speculative_generate(model, heads, **arguments)


# Prompts and the command line --------------------------------------------------------------------


def test_prompt_tokens_match_training_layout(smol_tokenizer):
    """The chat prompt is the token prefix that training puts before the assistant reply (no template drift)."""
    from caft.chat import IGNORE_INDEX, tokenize_conversation

    question = "Natalia sold clips to 48 of her friends. How many clips did she sell?"
    row = tokenize_conversation(
        smol_tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": "72"}], 512
    )
    first_label = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)

    assert encode_prompt(smol_tokenizer, question) == row["input_ids"][:first_label]
    assert encode_prompt(smol_tokenizer, question, chat_template=False) == smol_tokenizer(question)["input_ids"]


@pytest.fixture
def tiny_model_folder(tmp_path, smol_tokenizer):
    """A tiny llama with the SmolLM2 vocabulary saved with its tokenizer and a heads/ folder."""
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), eos_token_id=smol_tokenizer.eos_token_id)
    heads = random_heads(model, num_heads=2)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    save_heads(heads, folder / "heads")
    return folder, model, heads


def test_cli_generate_subprocess(tiny_model_folder, smol_tokenizer, tmp_path):
    folder, model, heads = tiny_model_folder
    output = tmp_path / "out.jsonl"
    command = [
        sys.executable, "-m", "caft.cli", "generate", "-model", str(folder), "--prompt", "Hello there",
        "--max-new-tokens", "9", "--num-draft", "2", "--output", str(output),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 0, completed.stderr

    prompt = torch.tensor([encode_prompt(smol_tokenizer, "Hello there")])
    expected = greedy_reference(model, prompt, 9, eos_token_id=smol_tokenizer.eos_token_id)
    record = json.loads(output.read_text())
    assert record["completion"] == smol_tokenizer.decode(expected, skip_special_tokens=True)
    assert record["new_tokens"] == len(expected)
    # The statistics go to stderr, so stdout holds only the generated text.
    assert "tokens per model forward" in completed.stderr
    assert "tokens/s" in completed.stderr
    assert "tokens per model forward" not in completed.stdout


def test_lora_run_folder_is_merged(tiny_model_folder, tmp_path):
    """A LoRA run folder loads as its base with the adapter merged in; its heads/ folder is the default."""
    from peft import LoraConfig, get_peft_model

    from caft.generate import load_model_for_generation

    folder, model, heads = tiny_model_folder
    torch.manual_seed(5)
    adapter_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter_model.peft_config["default"].base_model_name_or_path = str(folder)
    run = tmp_path / "run"
    adapter_model.save_pretrained(run)
    save_heads(heads, run / "heads")
    batch = torch.tensor([[5, 17, 300, 9, 42]])

    loaded, tokenizer, loaded_folder = load_model_for_generation(str(run))

    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, adapter_model(batch).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(loaded(batch).logits, model(batch).logits, atol=1e-3)
    assert loaded_folder == run
    assert len(tokenizer) == model.config.vocab_size


def test_load_heads_rejects_other_model(tiny_model_folder):
    folder, _, _ = tiny_model_folder
    wider = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match="do not fit this model"):
        load_heads_for(wider, folder / "heads")


def test_cli_several_prompts_headed(tiny_model_folder, write_jsonl, capsys):
    """With several prompts, stdout marks where each completion starts; one prompt prints the bare text."""
    folder, _, _ = tiny_model_folder
    path = write_jsonl([{"prompt": "one"}, {"prompt": "two"}, {"prompt": "three"}])

    assert cli_main(["generate", "-model", str(folder), "--prompts-file", str(path), "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("### completion")] == [
        "### completion 1/3", "### completion 2/3", "### completion 3/3",
    ]
    assert lines[0] == "### completion 1/3"

    assert cli_main(["generate", "-model", str(folder), "--prompt", "one", "--max-new-tokens", "4"]) == 0
    assert "### completion" not in capsys.readouterr().out


def test_cli_prompts_file_errors(tiny_model_folder, write_jsonl, capsys):
    folder, _, _ = tiny_model_folder
    path = write_jsonl([{"prompt": "ok"}, {"question": "no prompt field"}])

    code = cli_main(["generate", "-model", str(folder), "--prompts-file", str(path)])

    assert code == 2
    error = capsys.readouterr().err
    assert f"{path}, line 2" in error
    assert "missing field 'prompt'" in error
    assert "--prompt-field" in error


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "  "], "--prompt is empty"),
        (["--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
        (["--prompt", "hi", "--output", "{tmp}/missing/out.jsonl"], "does not exist"),
        (["--prompts-file", "{tmp}/prompts.jsonl", "--output", "{tmp}/prompts.jsonl"], "would overwrite the prompts"),
        (["--prompts-file", "{tmp}/empty_row.jsonl"], "line 2: field 'prompt' is empty"),
        (["--prompt", "hi", "--heads", "{tmp}/prompts.jsonl"], "is not a heads weights file"),
    ],
    ids=["empty-prompt", "negative-max-new-tokens", "missing-output-folder", "output-is-input", "empty-row", "not-heads"],
)
def test_cli_rejects_bad_options(tiny_model_folder, tmp_path, capsys, extra, message):
    folder, _, _ = tiny_model_folder
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello"}\n')
    (tmp_path / "empty_row.jsonl").write_text('{"prompt": "hello"}\n{"prompt": " "}\n')
    arguments = [value.replace("{tmp}", str(tmp_path)) for value in extra]

    code = cli_main(["generate", "-model", str(folder), *arguments])

    assert code == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "prompts.jsonl").read_text() == '{"prompt": "hello"}\n'


@pytest.mark.parametrize(
    "extra, warned",
    [
        (["--tree-size", "200", "--tree-stats", "{tmp}/eval_heads.json"], "--tree-size 200"),
        (["--tree-size", "200"], None),  # the built-in rates allow 42 nodes for 2 heads
        (["--draft-vocab", "5"], "--draft-vocab 5"),
        (["--tree-size", "8", "--draft-vocab", "0"], None),
    ],
    ids=["huge-tree", "tree-capped-by-rates", "tiny-draft-vocab", "usual-sizes"],
)
def test_cli_warns_slow_sizes(tiny_model_folder, tmp_path, caplog, extra, warned):
    """Sizes that keep the output exact but slow decoding down run with a warning; usual sizes run silently."""
    folder, _, _ = tiny_model_folder
    rates = [{"head": head, "rank_accuracy": [0.05] * 10} for head in (1, 2)]  # 10 + 100 possible nodes
    (tmp_path / "eval_heads.json").write_text(json.dumps({"heads_results": rates}))
    extra = [value.replace("{tmp}", str(tmp_path)) for value in extra]
    with caplog.at_level("WARNING", logger="caft.generate_cli"):
        code = cli_main(["generate", "-model", str(folder), "--prompt", "hi", "--max-new-tokens", "3", *extra])
    assert code == 0
    warnings = [record.getMessage() for record in caplog.records
                if record.name == "caft.generate_cli" and record.levelname == "WARNING"]
    if warned is None:
        assert warnings == []
    else:
        assert any(message.startswith(warned) for message in warnings), warnings


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--prompt", "hi", "--output", "{tmp}"], "is a folder"),
        (["--prompt", "hi", "--save-tree-stats", "{tmp}/missing/stats.json"], "folder"),
        (["--prompt", "hi", "--tree-size", "-1"], "--tree-size must be >= 0"),
        (["--prompt", "hi", "--temperature", "-1"], "--temperature must be"),
        (["--prompt", "hi", "--heads", "{tmp}/no-heads"], "no such folder or file"),
        (["--prompt", "hi", "--num-draft", "-1"], "--num-draft must be >= 0 (0 decodes one token per forward), got -1"),
        (["--prompt", "hi", "--heads", "{tmp}/heads", "--num-draft", "3"], "--num-draft 3 is more than the 2 heads"),
        (["--prompt", "hi", "--heads", "{tmp}/broken-heads", "--num-draft", "1"], "broken-heads/config.json: invalid JSON"),
    ],
    ids=["negative-max-new-tokens", "zero-max-new-tokens", "output-is-folder", "missing-stats-folder",
         "negative-tree-size", "negative-temperature", "missing-heads", "negative-num-draft", "num-draft-above-heads",
         "broken-heads-config"],
)
def test_cli_checks_options_before_loading(tmp_path, capsys, extra, message):
    """Option errors come before the model is loaded: with a model path that does not exist, they are what is reported."""
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "config.json").write_text(json.dumps({"num_heads": 2}))
    (tmp_path / "broken-heads").mkdir()
    (tmp_path / "broken-heads" / "config.json").write_text("{num_heads: 2}")
    arguments = [value.replace("{tmp}", str(tmp_path)) for value in extra]

    code = cli_main(["generate", "-model", str(tmp_path / "no-model"), *arguments])

    assert code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def sliding_window_folder(tmp_path, smol_tokenizer):
    """A tiny gemma3 (sliding-window layers) with the SmolLM2 vocabulary, its tokenizer and a heads/ folder."""
    model = tiny_model("gemma3", vocab_size=len(smol_tokenizer), eos_token_id=smol_tokenizer.eos_token_id)
    folder = tmp_path / "gemma3"
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    save_heads(random_heads(model, num_heads=2), folder / "heads")
    return folder, model


def test_cli_sliding_window_drafts_chain(sliding_window_folder, smol_tokenizer, caplog, capsys):
    """By default, a sliding-window model decodes with chain drafting instead of the default tree and lookup."""
    folder, model = sliding_window_folder

    with caplog.at_level("INFO", logger="caft.generate_cli"):
        code = cli_main(["generate", "-model", str(folder), "--prompt", "Hello there", "--max-new-tokens", "12"])

    assert code == 0
    messages = [record.getMessage() for record in caplog.records]
    assert any("draft trees and prompt lookup are off" in message for message in messages)
    assert not any(message.startswith("Draft tree from") for message in messages)  # no tree built, then dropped
    prompt = torch.tensor([encode_prompt(smol_tokenizer, "Hello there")])
    expected = greedy_reference(model, prompt, 12, eos_token_id=smol_tokenizer.eos_token_id)
    assert capsys.readouterr().out.strip() == smol_tokenizer.decode(expected, skip_special_tokens=True).strip()


@pytest.mark.parametrize("extra", [["--tree-size", "4"], ["--lookup-tokens", "2"]], ids=["tree", "lookup"])
def test_cli_sliding_window_rejects_tree(sliding_window_folder, capsys, extra):
    folder, _ = sliding_window_folder

    code = cli_main(["generate", "-model", str(folder), "--prompt", "Hello", "--max-new-tokens", "4", *extra])

    assert code == 2
    assert "pass --tree-size 0 --lookup-tokens 0" in capsys.readouterr().err


def test_cli_needs_heads(tmp_path, tiny_model_folder, capsys):
    folder, _, _ = tiny_model_folder
    (folder / "heads" / "model.safetensors").unlink()
    (folder / "heads" / "config.json").unlink()
    (folder / "heads").rmdir()

    code = cli_main(["generate", "-model", str(folder), "--prompt", "hi"])

    assert code == 2
    assert "pass the heads with --heads DIR" in capsys.readouterr().err


# Real model --------------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.parametrize("arch", ["transformer", "linear"])
def test_real_model_greedy_equals_generate(arch):
    """SmolLM2 with untrained heads (copies of the last layer, or zero linear heads that repeat the model's token)."""
    from caft.generate import load_model_for_generation

    model, tokenizer, _ = load_model_for_generation("smollm2")
    heads = build_heads(model, HeadsConfig(num_heads=4, arch=arch)).eval()
    questions = [
        "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
        "Count from 1 to 30, separated by commas.",
    ]
    for question in questions:
        prompt = torch.tensor([encode_prompt(tokenizer, question)])
        expected = greedy_reference(model, prompt, 40, eos_token_id=tokenizer.eos_token_id)

        result = speculative_generate(model, heads, prompt, max_new_tokens=40)
        tree = DraftTree.from_rank_accuracy(FALLBACK_RANK_ACCURACY, DEFAULT_TREE_SIZE, 4)
        with_lookup = speculative_generate(
            model, heads, prompt, max_new_tokens=40, tree=tree, lookup_tokens=DEFAULT_LOOKUP_TOKENS, draft_vocab=DEFAULT_DRAFT_VOCAB
        )

        assert result.tokens == expected
        assert with_lookup.tokens == expected
