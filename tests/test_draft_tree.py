"""Tree drafting: the tree's shape, exact greedy output, heads and KV cache along the accepted path, options."""

from __future__ import annotations

import contextlib
import copy
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
from transformers import DynamicCache

from caft.draft_tree import DEFAULT_TREE_SIZE, FALLBACK_RANK_ACCURACY, DraftTree, read_rank_accuracy
from caft.generate import HeadDrafter, keep_cache_positions, speculative_generate, write_tree_stats
from caft.generate_cli import choose_tree
from caft.heads import HeadsConfig, build_heads, find_decoder
from caft.model import add_auxiliary_heads, make_unembed, run_heads


# The tree's shape --------------------------------------------------------------------------------


def test_from_rank_accuracy_picks_the_likeliest_nodes():
    rates = [[0.5, 0.2, 0.1], [0.4, 0.3]]
    # Chances: (0,) .5, (1,) .2, (0,0) .2, (0,1) .15, (2,) .1, (1,0) .08, (1,1) .06, ...
    tree = DraftTree.from_rank_accuracy(rates, size=5, max_depth=2)
    assert set(tree.nodes) == {(0,), (1,), (0, 0), (0, 1), (2,)}
    assert tree.widths == [3, 2]
    assert tree.depth == 2
    assert [len(node) for node in tree.nodes] == sorted(len(node) for node in tree.nodes)  # breadth first
    # Heads beyond the list repeat its last row; depth is capped.
    deep = DraftTree.from_rank_accuracy([[0.9]], size=10, max_depth=3)
    assert deep.nodes == ((0,), (0, 0), (0, 0, 0))
    assert DraftTree.from_rank_accuracy(rates, size=0, max_depth=2).nodes == ()
    assert DraftTree.from_rank_accuracy(rates, size=4, max_depth=0).nodes == ()


def test_tree_tensors():
    tree = DraftTree(((0,), (1,), (0, 0), (1, 1)))
    assert tree.parents == [-1, 0, 0, 1, 2]
    assert tree.children == [[1, 2], [3], [4], [], []]
    assert tree.depths == [0, 1, 1, 2, 2]
    # [root, head 1 rank 0, head 1 rank 1, head 2 rank 0, head 2 rank 1]
    assert tree.token_index().tolist() == [0, 1, 2, 3, 4]
    mask = tree.ancestor_mask()
    assert mask[3].tolist() == [True, True, False, True, False]
    assert mask[4].tolist() == [True, False, True, False, True]
    assert mask[0].tolist() == [True, False, False, False, False]
    assert DraftTree.chain(3).nodes == ((0,), (0, 0), (0, 0, 0))
    assert tree.truncated(1).nodes == ((0,), (1,))


@pytest.mark.parametrize(
    "nodes, message",
    [((((0, 1),)), "has no parent"), (((0,), (0,)), "twice"), (((),), "non-empty"), (((-1,),), "ranks >= 0")],
)
def test_bad_trees_raise(nodes, message):
    with pytest.raises(ValueError, match=message):
        DraftTree(nodes)


def test_bad_rates_raise():
    with pytest.raises(ValueError, match="between 0 and 1"):
        DraftTree.from_rank_accuracy([[1.5]], 3, 2)
    with pytest.raises(ValueError, match="at least one rate"):
        DraftTree.from_rank_accuracy([], 3, 2)


# Greedy output -----------------------------------------------------------------------------------


TREE = DraftTree.from_rank_accuracy(FALLBACK_RANK_ACCURACY, size=12, max_depth=3)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(HEAD_VARIANTS))
@pytest.mark.parametrize("head_cache", [True, False], ids=["head-cache", "recompute"])
def test_tree_greedy_equals_generate(kind, variant, head_cache):
    model = tiny_model(kind, seed=3)
    heads = random_heads(model, **HEAD_VARIANTS[variant])
    prompt = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    expected = greedy_reference(model, prompt, 30)

    result = speculative_generate(model, heads, prompt, max_new_tokens=30, eos_token_id=[], head_cache=head_cache, tree=TREE)

    assert result.tokens == expected
    assert result.stats.reached[0] == result.stats.steps


def test_tree_accepts_candidates_a_chain_misses():
    """A case where the heads' best tokens are never right but lower-ranked candidates sometimes are."""
    model = tiny_model("llama", seed=3)
    heads = random_heads(model, **HEAD_VARIANTS["transformer-sibling"])
    prompt = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))

    chain = speculative_generate(model, heads, prompt, max_new_tokens=30, eos_token_id=[])
    tree = speculative_generate(model, heads, prompt, max_new_tokens=30, eos_token_id=[], tree=TREE)
    as_tree = speculative_generate(model, heads, prompt, max_new_tokens=30, eos_token_id=[], tree=DraftTree.chain(3))

    assert tree.tokens == chain.tokens
    assert chain.stats.accepted_drafts == 0 < tree.stats.accepted_drafts
    assert tree.stats.forwards < chain.stats.forwards
    # The chain written as a tree takes the same steps as chain drafting.
    assert (as_tree.tokens, as_tree.stats.forwards, as_tree.stats.accepted) == (chain.tokens, chain.stats.forwards, chain.stats.accepted)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 4, 9])
def test_tree_max_new_tokens_and_eos(max_new_tokens):
    model = tiny_model("gpt2", seed=3)
    heads = random_heads(model, **HEAD_VARIANTS["linear"])
    prompt = torch.tensor([[5, 9, 2, 33]])
    free_run = greedy_reference(model, prompt, 12)
    assert speculative_generate(model, heads, prompt, max_new_tokens=max_new_tokens, eos_token_id=[], tree=TREE).tokens == (
        free_run[:max_new_tokens]
    )
    eos = free_run[5]
    stopped = speculative_generate(model, heads, prompt, max_new_tokens=12, eos_token_id=eos, tree=TREE).tokens
    assert stopped == greedy_reference(model, prompt, 12, eos_token_id=eos)
    assert stopped[-1] == eos


# Heads and cache along the accepted path ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", [*HEAD_VARIANTS, "copies"])
def test_path_draft_logits_equal_run_heads(kind, variant):
    """After each tree step, the heads' logits equal caft.model.run_heads on the whole accepted sequence.

    With "copies" (unperturbed copies of the last layer) the tiny llama falls into a loop and paths
    reach depth 3, where a node's block position differs from its sequence position.
    """
    model = tiny_model(kind, seed=3)
    if variant == "copies":
        torch.manual_seed(3)
        heads = build_heads(model, HeadsConfig(num_heads=3)).eval()
        prompt = torch.randint(0, 64, (1, 7))
    else:
        heads = random_heads(model, **HEAD_VARIANTS[variant])
        prompt = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    with recorded_path_logits() as recorded:
        result = speculative_generate(model, heads, prompt, max_new_tokens=20, eos_token_id=[], tree=TREE)
    assert len(recorded) >= 3
    if variant == "copies" and kind == "llama":
        assert result.stats.accepted[2] > 0
    assert_path_logits_equal_run_heads(model, heads, prompt, result.tokens, recorded)


@contextlib.contextmanager
def recorded_path_logits():
    """Record (sequence length, path length, heads' logits) for every HeadDrafter.draft_logits_path call."""
    recorded = []
    original = HeadDrafter.draft_logits_path

    def recording(self, capture, path, past):
        logits = original(self, capture, path, past)
        recorded.append((past + len(path), len(path), [row.clone() for row in logits]))
        return logits

    HeadDrafter.draft_logits_path = recording
    try:
        yield recorded
    finally:
        HeadDrafter.draft_logits_path = original


def assert_path_logits_equal_run_heads(model, heads, prompt, tokens: list[int], recorded) -> None:
    """Check the recorded logits against caft.model.run_heads over prompt + tokens, at each recorded length."""
    sequence = torch.cat([prompt[0], torch.tensor(tokens)])
    reference = add_auxiliary_heads(copy.deepcopy(model), heads=copy.deepcopy(heads))
    with torch.no_grad():
        reference._caft_capture.active = True
        final_hidden = find_decoder(reference)(input_ids=sequence[None], use_cache=False).last_hidden_state
        states = run_heads(reference, final_hidden)
        reference._caft_capture.clear()
        for length, _, logits in recorded:
            for k, (actual, (hidden, own_head)) in enumerate(zip(logits, states), start=1):
                expected = make_unembed(reference, own_head)(hidden[:, length - 1])[0]
                torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"head {k} at {length}: {m}")


def test_kept_path_cache_equals_forward():
    """Keeping a path of a tree block leaves the cache a forward over just the path's tokens would leave."""
    model = tiny_model("llama")
    prompt = [3, 1, 4, 1, 5]
    tree = DraftTree(((0,), (1,), (1, 0), (1, 1)))
    block = [9, 20, 21, 30, 31]  # root, two head-1 candidates, two head-2 candidates under the second
    path = [0, 2, 4]  # root -> (1,) -> (1, 1)
    mask_block = torch.full((5, 5), torch.finfo(torch.float32).min).masked_fill(tree.ancestor_mask(), 0.0)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
        mask = torch.zeros(1, 1, 5, 10)
        mask[0, 0, :, 5:] = mask_block
        model(input_ids=torch.tensor([block]), position_ids=torch.tensor([[5, 6, 6, 7, 7]]), attention_mask=mask,
              cache=cache, use_cache=True)
        keep_cache_positions(cache, 5, path)

        expected = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prompt + [block[node] for node in path]]), cache=expected, use_cache=True)
    assert cache.get_seq_length() == expected.get_seq_length() == 8
    for layer, expected_layer in zip(cache.layers, expected.layers):
        torch.testing.assert_close(layer.keys, expected_layer.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values, expected_layer.values, atol=1e-5, rtol=1e-5)


# Options -----------------------------------------------------------------------------------------


def test_tree_argument_checks():
    model = tiny_model("llama")
    heads = random_heads(model)
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="greedy decoding only"):
        speculative_generate(model, heads, prompt, temperature=0.7, tree=TREE)
    with pytest.raises(ValueError, match="only 3 heads"):
        speculative_generate(model, heads, prompt, tree=DraftTree.chain(4))
    with pytest.raises(ValueError, match="deeper than num_draft"):
        speculative_generate(model, heads, prompt, num_draft=2, tree=TREE)
    assert speculative_generate(model, heads, prompt, max_new_tokens=3, num_draft=3, tree=DraftTree.chain(2)).tokens


def write_eval_heads(path, rates):
    results = [{"head": 0, "top1": 0.9}] + [{"head": k, "rank_accuracy": row} for k, row in enumerate(rates, start=1)]
    path.write_text(json.dumps({"heads_results": results}))


def test_choose_tree(tmp_path):
    heads_dir = tmp_path / "heads"
    (heads_dir / "eval").mkdir(parents=True)
    # No stats: the built-in rates; sampling: chain drafting unless asked otherwise.
    assert choose_tree(None, None, heads_dir, 4, None, 0.0) == DraftTree.from_rank_accuracy(FALLBACK_RANK_ACCURACY, DEFAULT_TREE_SIZE, 4)
    assert choose_tree(None, None, heads_dir, 4, None, 0.8) is None
    assert choose_tree(0, None, heads_dir, 4, None, 0.0) is None
    assert choose_tree(8, None, heads_dir, 4, 0, 0.0) is None  # --num-draft 0: no head drafts, no tree
    with pytest.raises(ValueError, match="--num-draft must be between 0 and the number of heads"):
        choose_tree(0, None, heads_dir, 4, 5, 0.0)
    with pytest.raises(ValueError, match="greedy decoding only"):
        choose_tree(8, None, heads_dir, 4, None, 0.8)
    with pytest.raises(ValueError, match="--tree-size must be >= 0"):
        choose_tree(-1, None, heads_dir, 4, None, 0.0)
    # eval-heads results beside the heads shape the tree; --num-draft caps its depth.
    write_eval_heads(heads_dir / "eval" / "eval_heads.json", [[0.1, 0.8], [0.9]])
    assert choose_tree(2, None, heads_dir, 2, 1, 0.0).nodes == ((0,), (1,))
    assert choose_tree(2, None, heads_dir, 2, None, 0.0).nodes == ((1,), (1, 0))


def test_read_rank_accuracy_errors(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match="missing.json"):
        read_rank_accuracy(missing)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"heads_results": [{"head": 0}, {"head": 1, "top1": 0.4}]}))
    with pytest.raises(ValueError, match="Rerun `caft eval-heads`"):
        read_rank_accuracy(old)
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    with pytest.raises(ValueError, match="no 'heads_results' list"):
        read_rank_accuracy(other)


def test_cli_tree_and_chain_agree(tiny_model_folder, capsys, caplog, tmp_path):
    """`caft generate` drafts with a tree by default, with a chain at --tree-size 0; the text is the same."""
    from caft.cli import main as cli_main

    folder, _, _ = tiny_model_folder
    outputs = {}
    for label, extra in {"tree": [], "chain": ["--tree-size", "0"]}.items():
        out = tmp_path / f"{label}.jsonl"
        with caplog.at_level("INFO", logger="caft.generate_cli"):
            code = cli_main(["generate", "-model", str(folder), "--prompt", "Hello there", "--max-new-tokens", "12",
                             "--output", str(out), *extra])
        assert code == 0
        outputs[label] = json.loads(out.read_text())["completion"]
    assert outputs["tree"] == outputs["chain"]
    assert "Draft tree from built-in rates" in caplog.text

    code = cli_main(["generate", "-model", str(folder), "--prompt", "hi", "--tree-size", "8", "--temperature", "0.5"])
    assert code == 2
    assert "--tree-size works with greedy decoding only" in capsys.readouterr().err


# Rank rates measured while generating ------------------------------------------------------------


def test_measured_rank_rates_follow_acceptance(tmp_path):
    """In greedy chain drafting a draft is accepted exactly when the model's token is the head's best one."""
    model = tiny_model("llama", seed=3)
    torch.manual_seed(3)
    heads = build_heads(model, HeadsConfig(num_heads=3)).eval()
    prompt = torch.randint(0, 64, (1, 7))
    stats = speculative_generate(model, heads, prompt, max_new_tokens=40, eos_token_id=[]).stats

    for k in range(3):
        assert stats.rank_hits[k][0] == stats.accepted[k]
        assert sum(stats.rank_hits[k]) <= stats.reached[k]
    assert sum(stats.rank_hits[0][1:]) > 0  # some rejected drafts had the model's token at a lower rank
    merged = stats.merge(stats)
    assert merged.rank_hits[0] == [2 * hits for hits in stats.rank_hits[0]]

    path = tmp_path / "tree_stats.json"
    write_tree_stats(stats, path, "test")
    rates = read_rank_accuracy(path)
    assert rates[0][0] == pytest.approx(stats.accepted[0] / stats.reached[0])
    assert choose_tree(4, str(path), tmp_path, 3, None, 0.0) == DraftTree.from_rank_accuracy(rates, 4, 3)


def test_cli_saves_tree_stats(tiny_model_folder, tmp_path, capsys):
    from caft.cli import main as cli_main

    folder, _, heads = tiny_model_folder
    path = tmp_path / "tree_stats.json"
    code = cli_main(["generate", "-model", str(folder), "--prompt", "Hello", "--max-new-tokens", "12", "--tree-size", "0",
                     "--save-tree-stats", str(path)])
    assert code == 0
    assert len(read_rank_accuracy(path)) == len(heads)
    assert json.loads(path.read_text())["heads_results"][0]["steps"] > 0

    code = cli_main(["generate", "-model", str(folder), "--prompt", "Hello", "--temperature", "0.5",
                     "--save-tree-stats", str(path)])
    assert code == 2
    assert "--save-tree-stats measures greedy decoding" in capsys.readouterr().err
