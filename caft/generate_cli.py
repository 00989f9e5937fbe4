"""Generate with self-speculative decoding: the auxiliary heads draft, the model verifies.

    caft generate -model runs/my-run --heads runs/my-run/heads --prompt "What is 12 * 7?" --stream

The `caft generate` command: options, their checks before the model loads, the draft tree and
prompt lookup defaults, and the loop over prompts. The decoding itself is in caft/generate.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import torch

from .draft_tree import DEFAULT_TREE_SIZE, FALLBACK_RANK_ACCURACY, DraftTree, read_rank_accuracy
from .eval_heads import RESULTS_NAME
from .heads import CONFIG_NAME, read_heads_config
from .generate import (
    DEFAULT_DRAFT_VOCAB,
    SpeculativeStats,
    check_temperature,
    drafting_support,
    encode_prompt,
    load_heads_for,
    load_model_for_generation,
    prepacked_linears,
    speculative_generate,
    write_tree_stats,
)
from .lookup import DEFAULT_LOOKUP_TOKENS

logger = logging.getLogger(__name__)


def read_prompts(path: str | Path, prompt_field: str) -> list[str]:
    """Read the `prompt_field` string of every row of a .jsonl/.json file."""
    from .data import DataError, _iter_file_rows

    prompts = []
    for location, row in _iter_file_rows(Path(path)):
        if not isinstance(row, dict):
            raise DataError(f"{location}: expected a JSON object, got {type(row).__name__}.")
        if prompt_field not in row:
            raise DataError(
                f"{location}: missing field {prompt_field!r} (fields: {', '.join(sorted(row)) or 'none'}). "
                "Name the prompt field with --prompt-field."
            )
        if not isinstance(row[prompt_field], str):
            raise DataError(f"{location}: field {prompt_field!r} must be a string, got {type(row[prompt_field]).__name__}.")
        if not row[prompt_field].strip():
            raise DataError(f"{location}: field {prompt_field!r} is empty. Remove the row or give it a prompt.")
        prompts.append(row[prompt_field])
    if not prompts:
        raise DataError(f"{path}: no prompts found. Add rows with a {prompt_field!r} field.")
    return prompts


def register(subparsers) -> None:
    """Add the `caft generate` subcommand."""
    parser = subparsers.add_parser(
        "generate",
        help="Generate with self-speculative decoding: the auxiliary heads draft, the model verifies.",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--model-name-or-path", "--model", "-model", default="smollm2",
        help="A base model (hub id, folder, or 'smollm2'), a merged model folder, or a caft LoRA run folder "
        "(default: %(default)s).",
    )
    parser.add_argument("--heads", help="Heads folder or heads.pth file (default: the heads/ folder inside the model folder).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="One prompt text.")
    source.add_argument("--prompts-file", help="A .jsonl or .json file of prompts, one per row.")
    parser.add_argument("--prompt-field", default="prompt", help="Field of --prompts-file rows holding the prompt (default: %(default)s).")
    parser.add_argument("--num-draft", type=int, default=None, help="Drafted tokens per step, from heads 1..N (default: all heads).")
    parser.add_argument(
        "--tree-size", type=int, default=None,
        help="Candidates verified per step in a draft tree (several tokens per head, greedy decoding only); 0 drafts "
        f"one chain of tokens (default: {DEFAULT_TREE_SIZE} for greedy decoding, 0 for sampling).",
    )
    parser.add_argument(
        "--lookup-tokens", type=int, default=None,
        help="Tokens per step proposed by prompt lookup (the tokens that followed the latest earlier occurrence of "
        "the last 1-3 tokens in the prompt or reply), verified in the same forward as the heads' drafts; greedy "
        f"decoding only; 0 turns it off (default: {DEFAULT_LOOKUP_TOKENS} for greedy decoding, 0 for sampling).",
    )
    parser.add_argument(
        "--draft-vocab", type=int, default=DEFAULT_DRAFT_VOCAB,
        help="The heads draft only token ids below this number, which makes their unembedding cheaper (BPE "
        "vocabularies list frequent tokens first); the output does not change; 0 is the whole vocabulary "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--tree-stats",
        help="eval_heads.json of `caft eval-heads` whose rank accuracies shape the tree (default: <heads>/eval/"
        "eval_heads.json when present, else rates measured on SmolLM2's distilled heads).",
    )
    parser.add_argument(
        "--save-tree-stats",
        help="Write the rank rates measured while generating (greedy only) to this JSON file, in the form --tree-stats "
        "reads: a tree built from them fits the steps where drafts are actually checked.",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Maximum new tokens per prompt (default: %(default)s).")
    parser.add_argument(
        "--chat-template", action=argparse.BooleanOptionalAction, default=True,
        help="Wrap each prompt as a user turn of the tokenizer's chat template (default: on).",
    )
    parser.add_argument("--stream", action="store_true", help="Print text as tokens are accepted.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding; above 0, sampling (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling generator (default: %(default)s).")
    parser.add_argument(
        "--head-cache", action=argparse.BooleanOptionalAction, default=True,
        help="Keep a KV cache per head layer; --no-head-cache recomputes the heads' keys and values at each step.",
    )
    parser.add_argument(
        "--prepacked-linears", action=argparse.BooleanOptionalAction, default=True,
        help="On CPU in float32, run linear layers through oneDNN with prepacked weights, which makes verifying a "
        "block of tokens about as fast as decoding one (default: on).",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="Weight dtype.")
    parser.add_argument("--output", help="Write one JSON object per prompt (prompt, completion, counts) to this .jsonl file.")
    parser.set_defaults(handler=run_generate_command)


def check_tree_size(tree_size: int | None) -> None:
    """Raise ValueError for a negative --tree-size (None picks the default)."""
    if tree_size is not None and tree_size < 0:
        raise ValueError(f"--tree-size must be >= 0, got {tree_size}.")


def choose_tree(tree_size: int | None, tree_stats: str | None, heads_source, num_heads: int, num_draft: int | None,
                temperature: float) -> DraftTree | None:
    """Return the draft tree for `caft generate`'s options, or None for chain drafting."""
    check_tree_size(tree_size)
    if tree_size is None:
        tree_size = DEFAULT_TREE_SIZE if temperature == 0 else 0
    elif tree_size > 0 and temperature != 0:
        raise ValueError(
            "--tree-size works with greedy decoding only (--temperature 0); with sampling, use --tree-size 0."
        )
    depth = num_heads if num_draft is None else num_draft
    if not 0 <= depth <= num_heads:
        raise ValueError(f"--num-draft must be between 0 and the number of heads ({num_heads}), got {depth}.")
    if tree_size == 0 or depth == 0:  # no head drafts, so there is no tree (prompt lookup still drafts)
        return None
    heads_path = Path(heads_source)
    default_stats = (heads_path if heads_path.is_dir() else heads_path.parent) / "eval" / RESULTS_NAME  # eval-heads' --out
    if tree_stats is not None:
        rank_accuracy, source = read_rank_accuracy(tree_stats), tree_stats
    elif default_stats.is_file():
        rank_accuracy, source = read_rank_accuracy(default_stats), str(default_stats)
    else:
        rank_accuracy, source = FALLBACK_RANK_ACCURACY, "built-in rates of SmolLM2's distilled heads"
    tree = DraftTree.from_rank_accuracy(rank_accuracy, tree_size, depth)
    logger.info("Draft tree from %s: %s", source, tree.describe())
    return tree


def choose_lookup_tokens(lookup_tokens: int | None, temperature: float) -> int:
    """Return the prompt lookup length for `caft generate`'s options: the default for greedy decoding, 0 for sampling."""
    if lookup_tokens is None:
        return DEFAULT_LOOKUP_TOKENS if temperature == 0 else 0
    if lookup_tokens < 0:
        raise ValueError(f"--lookup-tokens must be >= 0 (0 turns prompt lookup off), got {lookup_tokens}.")
    if lookup_tokens > 0 and temperature != 0:
        raise ValueError("--lookup-tokens works with greedy decoding only (--temperature 0); with sampling, use 0.")
    return lookup_tokens


def run_generate_command(args: argparse.Namespace) -> int:
    """Handle `caft generate`: load, generate for every prompt, print the texts and the statistics."""
    if args.save_tree_stats and args.temperature != 0:
        raise ValueError("--save-tree-stats measures greedy decoding; use it with --temperature 0.")
    tree_requested = bool(args.tree_size) or bool(args.lookup_tokens)  # given on the command line, not defaults
    args.lookup_tokens = choose_lookup_tokens(args.lookup_tokens, args.temperature)
    if args.draft_vocab < 0:
        raise ValueError(f"--draft-vocab must be >= 0 (0 is the whole vocabulary), got {args.draft_vocab}.")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty. Give the text to continue.")
    check_temperature(args.temperature, "--temperature")
    check_tree_size(args.tree_size)
    if args.heads is not None and not Path(args.heads).exists():
        raise FileNotFoundError(f"--heads {args.heads}: no such folder or file. Pass the heads/ folder of `caft train-heads`.")
    _check_output_path("--output", args.output, args.prompts_file)
    _check_output_path("--save-tree-stats", args.save_tree_stats, args.prompts_file)
    _check_num_draft(args.num_draft, _heads_folder_before_loading(args.heads, args.model_name_or_path))
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file, args.prompt_field)
    model, tokenizer, folder = load_model_for_generation(args.model_name_or_path, args.dtype)
    heads_source = args.heads
    if heads_source is None:
        if folder is None or not (folder / "heads").is_dir():
            raise FileNotFoundError(f"No heads/ folder inside {args.model_name_or_path}; pass the heads with --heads DIR.")
        heads_source = folder / "heads"
    heads = load_heads_for(model, heads_source)
    if drafting_support(model) == "chain":
        args.tree_size, args.lookup_tokens = _chain_for_sliding_window(model, tree_requested)
    tree = choose_tree(args.tree_size, args.tree_stats, heads_source, len(heads), args.num_draft, args.temperature)
    _warn_about_slow_sizes(args.tree_size, tree, args.lookup_tokens, args.draft_vocab, args.num_draft)

    output_file = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        with prepacked_linears(model, heads) if args.prepacked_linears else contextlib.nullcontext():
            total = _generate_all(args, prompts, model, heads, tokenizer, output_file, tree)
    finally:
        if output_file is not None:
            output_file.close()
    print(f"\n{total.prompts} prompt(s): {total.summary()}", file=sys.stderr)
    if args.save_tree_stats:
        write_tree_stats(total, args.save_tree_stats, f"caft generate on {len(prompts)} prompt(s)")
        print(f"tree stats: {args.save_tree_stats}", file=sys.stderr)
    return 0


def _heads_folder_before_loading(heads: str | None, model_name_or_path: str) -> Path | None:
    """Return the heads folder that `caft generate` will load, when it is known before the model loads."""
    if heads is not None:
        return Path(heads) if Path(heads).is_dir() else None
    inside = Path(model_name_or_path) / "heads"
    return inside if inside.is_dir() else None


def _check_num_draft(num_draft: int | None, heads_folder: Path | None) -> None:
    """Reject a negative --num-draft, and one above the saved number of heads when the heads folder has a config."""
    if num_draft is None:
        return
    if num_draft < 0:
        raise ValueError(f"--num-draft must be >= 0 (0 decodes one token per forward), got {num_draft}.")
    config_path = heads_folder / CONFIG_NAME if heads_folder is not None else None
    if config_path is None or not config_path.is_file():
        return  # speculative_generate checks it against the loaded heads
    num_heads = read_heads_config(config_path).num_heads
    if num_draft > num_heads:
        raise ValueError(f"--num-draft {num_draft} is more than the {num_heads} heads in {heads_folder}; use at most {num_heads}.")


def _chain_for_sliding_window(model, tree_requested: bool) -> tuple[int, int]:
    """Return the tree size and lookup tokens (0 and 0) of chain drafting for a model with sliding-window layers.

    Raise ValueError instead when the command line asked for a tree or for prompt lookup.
    """
    name = type(model).__name__
    if tree_requested:
        raise ValueError(
            f"{name} has sliding-window attention layers; --tree-size and --lookup-tokens need full attention in "
            "every layer. Drop them or pass --tree-size 0 --lookup-tokens 0 (chain drafting)."
        )
    logger.info("%s has sliding-window attention layers: draft trees and prompt lookup are off.", name)
    return 0, 0


LARGE_TREE = 64
"""Tree nodes above which `caft generate` warns. docs/benchmarks.md measured trees of 2 to 16 nodes in float32, where
blocks of 17 tokens already cost 1.6-2.2x one token on CPU; the limit is a rough estimate beyond that."""
SMALL_DRAFT_VOCAB = 1024
"""Below this many ids, the heads cannot draft most tokens of ordinary text."""


def _warn_about_slow_sizes(tree_size: int | None, tree: DraftTree | None, lookup_tokens: int, draft_vocab: int,
                           num_draft: int | None) -> None:
    """Warn about sizes that keep the output exact but make decoding slower than without drafting."""
    if tree is not None and len(tree) > LARGE_TREE:
        logger.warning(
            "--tree-size %d: each step verifies up to %d tokens (the tree, the lookup branch and the model's token), "
            "which costs several times one token on CPU; trees of 2 to 8 were fastest in docs/benchmarks.md.",
            tree_size, len(tree) + lookup_tokens + 1,
        )
    if 0 < draft_vocab < SMALL_DRAFT_VOCAB and num_draft != 0:
        logger.warning(
            "--draft-vocab %d: the heads can only draft token ids below %d, so few drafts will be accepted; "
            "the default is %d (0 = all).", draft_vocab, draft_vocab, DEFAULT_DRAFT_VOCAB,
        )


def _check_output_path(flag: str, output: str | None, prompts_file: str | None) -> None:
    """Reject an output path whose folder is missing, that is a folder or that is the prompts file, before loading."""
    if output is None:
        return
    path = Path(output)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag} {output}: folder {path.parent} does not exist. Create it or pick another path.")
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {output} is a folder; give a file path inside it, e.g. {path / 'out.jsonl'}.")
    if prompts_file is not None and path.exists() and path.resolve() == Path(prompts_file).resolve():
        raise ValueError(f"{flag} {output} is the prompts file; writing it would overwrite the prompts. Pick another path.")


def _generate_all(args, prompts: list[str], model, heads, tokenizer, output_file, tree) -> SpeculativeStats:
    from transformers import TextStreamer

    total = SpeculativeStats()
    for index, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt, args.chat_template)
        if len(prompts) > 1:  # completions may span several lines, so each one gets a header
            print(f"### completion {index + 1}/{len(prompts)}", flush=True)
        on_tokens = None
        if args.stream:
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            streamer.put(torch.tensor(ids))
            on_tokens = lambda new, streamer=streamer: streamer.put(torch.tensor(new))  # noqa: E731
        result = speculative_generate(
            model, heads, ids, max_new_tokens=args.max_new_tokens, num_draft=args.num_draft,
            temperature=args.temperature, seed=args.seed + index, head_cache=args.head_cache, on_tokens=on_tokens,
            tree=tree, lookup_tokens=args.lookup_tokens, draft_vocab=args.draft_vocab,
        )
        text = tokenizer.decode(result.tokens, skip_special_tokens=True)
        if args.stream:
            streamer.end()
        else:
            print(text, flush=True)
        if len(prompts) > 1:
            print(f"[prompt {index + 1}/{len(prompts)}] {result.stats.summary()}\n", file=sys.stderr)
        if output_file is not None:
            record = {"prompt": prompt, "completion": text, "new_tokens": len(result.tokens),
                      "tokens_per_forward": round(result.stats.tokens_per_forward, 3)}
            output_file.write(json.dumps(record) + "\n")
        total = total.merge(result.stats)
    return total
