"""Prompt lookup: the n-gram index, the branch it adds to a draft tree, and exact greedy output with it."""

from __future__ import annotations

import json

import pytest
import torch
from test_generate import (  # noqa: F401 (one_thread and tiny_model_folder are fixtures)
    HEAD_VARIANTS,
    greedy_reference,
    one_thread,
    random_heads,
    tiny_model,
    tiny_model_folder,
)

from test_draft_tree import assert_path_logits_equal_run_heads, recorded_path_logits

from caft.cli import main
from caft.draft_tree import FALLBACK_RANK_ACCURACY, DraftTree, ancestor_mask, attach_chain
from caft.generate import SpeculativeStats, speculative_generate
from caft.generate_cli import choose_lookup_tokens
from caft.heads import HeadsConfig, build_heads
from caft.lookup import DEFAULT_LOOKUP_TOKENS, NgramLookup

TREE = DraftTree.from_rank_accuracy(FALLBACK_RANK_ACCURACY, size=6, max_depth=3)


# The n-gram index --------------------------------------------------------------------------------


def brute_force_proposal(tokens: list[int], count: int, max_ngram: int) -> list[int]:
    """Scan backwards for the latest earlier occurrence of the longest suffix (the definition, slowly)."""
    for n in range(min(max_ngram, len(tokens)), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                proposal = tokens[start + n : start + n + count]
                while len(proposal) < count:  # the loop from the match to the end repeats
                    proposal.append(proposal[len(proposal) - (len(tokens) - start - n)])
                return proposal
    return []


def test_lookup_prefers_longest_and_latest_match():
    lookup = NgramLookup([1, 2, 3, 9, 9, 2, 3, 7, 8, 5, 2, 3], max_ngram=3)
    # Suffix (5, 2, 3) never occurred before; (2, 3) did twice, and the latest was followed by 7, 8.
    assert lookup.propose(3) == [7, 8, 5]
    assert lookup.propose(1) == [7]
    lookup.extend([7])
    # Now the suffix (2, 3, 7) occurred before, followed by 8, 5, 2, 3, 7.
    assert lookup.propose(5) == [8, 5, 2, 3, 7]
    # Past the end of the sequence, the proposal repeats the 5 tokens since the match.
    assert lookup.propose(8) == [8, 5, 2, 3, 7, 8, 5, 2]
    assert lookup.propose(0) == []


def test_lookup_without_match():
    assert NgramLookup([1, 2, 3, 4]).propose(4) == []
    assert NgramLookup([]).propose(4) == []
    assert NgramLookup([5]).propose(4) == []
    # A repeated token matches itself one position earlier, and the loop continues.
    assert NgramLookup([5, 5]).propose(4) == [5, 5, 5, 5]
    assert NgramLookup([1, 2, 1, 2]).propose(5) == [1, 2, 1, 2, 1]


def test_lookup_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (300,), generator=generator).tolist()
    incremental = NgramLookup(tokens[:5], max_ngram=3)
    for length in range(5, len(tokens)):
        assert incremental.propose(4) == brute_force_proposal(tokens[:length], 4, 3), f"after {length} tokens"
        incremental.extend(tokens[length : length + 1])


def test_lookup_rejects_bad_ngram():
    with pytest.raises(ValueError, match="max_ngram must be >= 1"):
        NgramLookup([1, 2], max_ngram=0)


# The branch in the tree --------------------------------------------------------------------------


def test_attach_chain_shares_existing_nodes():
    tree = DraftTree(((0,), (1,), (0, 0)))  # root 0, head-1 nodes 1 and 2, node 3 below node 1
    tokens = [10, 20, 21, 30]
    parents, children, new_tokens, first_new = attach_chain(tree.parents, tree.children, tokens, [20, 30, 40, 50])
    # 20 and 30 are nodes 1 and 3 already, so only 40 and 50 are new, below node 3.
    assert first_new == 4
    assert new_tokens == [10, 20, 21, 30, 40, 50]
    assert parents == [-1, 0, 0, 1, 3, 4]
    assert children == [[1, 2], [3], [], [4], [5], []]
    # The inputs are unchanged.
    assert tree.children == [[1, 2], [3], [], []]
    assert tokens == [10, 20, 21, 30]


def test_attach_chain_new_branch_and_no_new_nodes():
    tree = DraftTree(((0,), (1,)))
    parents, children, tokens, first_new = attach_chain(tree.parents, tree.children, [10, 20, 21], [22, 23])
    assert (parents, children, tokens, first_new) == ([-1, 0, 0, 0, 3], [[1, 2, 3], [], [], [4], []], [10, 20, 21, 22, 23], 3)
    mask = ancestor_mask(parents)
    assert mask[4].tolist() == [True, False, False, True, True]
    # A chain that the tree already contains adds nothing.
    parents, _, tokens, first_new = attach_chain(tree.parents, tree.children, [10, 20, 21], [21])
    assert first_new == len(parents) == 3
    assert tokens == [10, 20, 21]


# Greedy output -----------------------------------------------------------------------------------


def looping_case(kind: str):
    """A tiny model whose greedy reply falls into a loop, so prompt lookup's proposals get accepted."""
    model = tiny_model(kind, seed=3)
    torch.manual_seed(3)
    heads = build_heads(model, HeadsConfig(num_heads=3)).eval()
    prompt = torch.randint(0, 64, (1, 7))
    return model, heads, prompt


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(HEAD_VARIANTS))
@pytest.mark.parametrize("tree", [TREE, None], ids=["tree", "chain"])
def test_lookup_greedy_equals_generate(kind, variant, tree):
    model = tiny_model(kind, seed=3)
    heads = random_heads(model, **HEAD_VARIANTS[variant])
    prompt = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    expected = greedy_reference(model, prompt, 40)

    result = speculative_generate(model, heads, prompt, max_new_tokens=40, eos_token_id=[], tree=tree, lookup_tokens=5)

    assert result.tokens == expected
    assert result.stats.lookup_accepted <= result.stats.lookup_drafted
    # Each block holds the heads' nodes (fewer near max_new_tokens) plus the new lookup nodes.
    heads_nodes = len(tree) if tree is not None else 3
    assert result.stats.lookup_drafted <= result.stats.steps * 5
    assert result.stats.block_tokens - result.stats.lookup_drafted <= result.stats.steps * (1 + heads_nodes)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lookup_saves_forwards_in_a_loop(kind):
    model, heads, prompt = looping_case(kind)
    expected = greedy_reference(model, prompt, 40)

    without = speculative_generate(model, heads, prompt, max_new_tokens=40, eos_token_id=[], tree=TREE)
    with_lookup = speculative_generate(model, heads, prompt, max_new_tokens=40, eos_token_id=[], tree=TREE, lookup_tokens=6)
    lookup_only = speculative_generate(model, heads, prompt, max_new_tokens=40, eos_token_id=[], num_draft=0, lookup_tokens=6)

    assert without.tokens == with_lookup.tokens == lookup_only.tokens == expected
    assert with_lookup.stats.lookup_accepted > 0
    assert with_lookup.stats.forwards < without.stats.forwards
    # Without heads every accepted draft came from the lookup branch.
    assert lookup_only.stats.accepted_drafts == lookup_only.stats.lookup_accepted > 0
    assert lookup_only.stats.forwards < 41


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("lookup_tokens", [0, 3, 8])
def test_lookup_counters_keep_their_meaning(kind, lookup_tokens):
    """Head k's counters count its own drafts only; each accepted draft is a head's or the lookup branch's."""
    model, heads, prompt = looping_case(kind)
    stats = speculative_generate(
        model, heads, prompt, max_new_tokens=40, eos_token_id=[], tree=TREE, lookup_tokens=lookup_tokens
    ).stats

    assert stats.reached[0] == stats.steps  # the tree always has head-1 candidates
    for depth in range(len(stats.reached)):
        assert stats.accepted[depth] <= stats.reached[depth]
        if depth + 1 < len(stats.reached):
            assert stats.reached[depth + 1] <= stats.accepted[depth]
    assert stats.accepted_drafts == sum(stats.accepted) + stats.lookup_accepted
    assert stats.lookup_accepted <= stats.lookup_drafted
    assert stats.lookup_tokens == lookup_tokens
    if lookup_tokens:
        assert stats.lookup_accepted > 0
        assert f"{stats.lookup_accepted} of its {stats.lookup_drafted} tokens accepted" in stats.summary()
    else:
        assert stats.lookup_steps == stats.lookup_drafted == stats.lookup_accepted == 0
        assert "prompt lookup" not in stats.summary()


def test_summary_names_idle_lookup():
    """With lookup on, the summary mentions it even when every proposal was already in the heads' tree."""
    idle = SpeculativeStats(prompts=1, new_tokens=4, forwards=2, steps=1, lookup_tokens=4)
    assert "prompt lookup found nothing the heads had not proposed" in idle.summary()
    assert "prompt lookup" not in SpeculativeStats(prompts=1, new_tokens=4, forwards=2, steps=1).summary()
    assert idle.merge(SpeculativeStats()).lookup_tokens == 4
    no_steps = SpeculativeStats(prompts=1, new_tokens=1, forwards=1, lookup_tokens=4)  # max_new_tokens=1
    assert "prompt lookup" not in no_steps.summary()


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7, 12])
def test_lookup_max_new_tokens_and_eos(max_new_tokens):
    model, heads, prompt = looping_case("llama")
    free_run = greedy_reference(model, prompt, 20)
    result = speculative_generate(model, heads, prompt, max_new_tokens=max_new_tokens, eos_token_id=[], tree=TREE, lookup_tokens=8)
    assert result.tokens == free_run[:max_new_tokens]
    eos = free_run[9]
    stopped = speculative_generate(model, heads, prompt, max_new_tokens=20, eos_token_id=eos, tree=TREE, lookup_tokens=8).tokens
    assert stopped == greedy_reference(model, prompt, 20, eos_token_id=eos)
    assert stopped[-1] == eos


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_heads_after_lookup_path_equal_run_heads(kind):
    """After steps that accept lookup nodes deeper than the heads' tree, the heads' logits equal run_heads."""
    model, heads, prompt = looping_case(kind)
    with recorded_path_logits() as recorded:
        result = speculative_generate(model, heads, prompt, max_new_tokens=30, eos_token_id=[], tree=TREE, lookup_tokens=6)
    assert max(path_length for _, path_length, _ in recorded) > TREE.depth + 1  # a path went below the heads' tree
    assert_path_logits_equal_run_heads(model, heads, prompt, result.tokens, recorded)


# Options -----------------------------------------------------------------------------------------


def test_lookup_argument_checks():
    model = tiny_model("llama")
    heads = random_heads(model)
    with pytest.raises(ValueError, match="greedy decoding only"):
        speculative_generate(model, heads, [1, 2, 3], max_new_tokens=4, temperature=0.7, lookup_tokens=4)
    with pytest.raises(ValueError, match="lookup_tokens must be >= 0"):
        speculative_generate(model, heads, [1, 2, 3], max_new_tokens=4, lookup_tokens=-1)
    assert choose_lookup_tokens(None, 0.0) == DEFAULT_LOOKUP_TOKENS
    assert choose_lookup_tokens(None, 0.8) == 0
    assert choose_lookup_tokens(3, 0.0) == 3
    assert choose_lookup_tokens(0, 0.8) == 0
    with pytest.raises(ValueError, match="--lookup-tokens works with greedy decoding only"):
        choose_lookup_tokens(2, 0.8)
    with pytest.raises(ValueError, match="--lookup-tokens must be >= 0"):
        choose_lookup_tokens(-2, 0.0)


def test_cli_lookup_on_and_off_agree(tiny_model_folder, tmp_path, capsys):
    """`caft generate` adds prompt lookup by default; the text equals that of --lookup-tokens 0."""
    folder, _, _ = tiny_model_folder
    completions = {}
    for label, extra in {"off": ["--lookup-tokens", "0"], "default": []}.items():
        out = tmp_path / f"{label}.jsonl"
        code = main(["generate", "-model", str(folder), "--prompt", "one two one two one two", "--max-new-tokens", "24",
                     "--output", str(out), *extra])
        assert code == 0
        completions[label] = json.loads(out.read_text())["completion"]
    assert completions["off"] == completions["default"]

    code = main(["generate", "-model", str(folder), "--prompt", "hi", "--temperature", "0.5", "--lookup-tokens", "2"])
    assert code == 2
    assert "--lookup-tokens works with greedy decoding only" in capsys.readouterr().err
