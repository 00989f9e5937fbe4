"""Benchmark: plain greedy `model.generate` against self-speculative decoding with trained heads, batch size 1.

    nice python benchmarks/spec_decoding.py --heads /tmp/heads-gsm8k/heads --questions 50

Both methods answer the same held-out GSM8K test questions (chat template, greedy, up to
--max-new-tokens). The runs alternate question by question, so a change in machine load hits
both alike. The script checks that the outputs are identical token for token and prints
tokens/s of each method, their ratio in wall-clock time and in CPU time of this process (the
second is less sensitive to other processes on a shared machine when torch uses one thread),
the mean number of tokens per model forward, the acceptance
rate of each head and where the speculative time goes. It then times one model forward over
blocks as large as each method verifies at a typical context length (the verification cost
per step). Each --num-draft runs once per combination of --tree-size (0 drafts a chain, N > 0 a
tree of N candidates, caft/draft_tree.py), --lookup-tokens (prompt lookup, caft/lookup.py) and
--draft-vocab, or once per --combination TREE:LOOKUP:VOCAB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caft.assets import shared_data_dir  # noqa: E402
from caft.draft_tree import DEFAULT_TREE_SIZE  # noqa: E402
from caft.generate import (  # noqa: E402
    DEFAULT_DRAFT_VOCAB,
    SpeculativeStats,
    encode_prompt,
    load_heads_for,
    load_model_for_generation,
    prepacked_linears,
    speculative_generate,
    write_tree_stats,
)
from caft.generate_cli import choose_tree  # noqa: E402
from caft.grouped_attention import grouped_attention_in_kernel  # noqa: E402
from caft.lookup import DEFAULT_LOOKUP_TOKENS  # noqa: E402

DEFAULT_QUESTIONS = str(shared_data_dir() / "gsm8k" / "test.jsonl")
DEFAULT_CALIBRATION = str(shared_data_dir() / "gsm8k" / "train.jsonl")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="Model name or folder (default: %(default)s).")
    parser.add_argument("--heads", required=True, help="Heads folder written by `caft train-heads`.")
    parser.add_argument("--data", default=DEFAULT_QUESTIONS, help="GSM8K-style .jsonl with a `question` field (default: %(default)s).")
    parser.add_argument("--questions", type=int, default=50, help="Number of questions, from the start of --data (default: %(default)s).")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Maximum new tokens per question (default: %(default)s).")
    parser.add_argument(
        "--num-draft", type=int, nargs="+", default=None,
        help="Drafted tokens per step; several values run one speculative method each (default: all heads).",
    )
    parser.add_argument(
        "--tree-size", type=int, nargs="+", default=[DEFAULT_TREE_SIZE],
        help="Draft tree sizes to run for each --num-draft; 0 is chain drafting (default: %(default)s).",
    )
    parser.add_argument(
        "--lookup-tokens", type=int, nargs="+", default=[DEFAULT_LOOKUP_TOKENS],
        help="Prompt lookup branch lengths to run for each tree; 0 is none (default: %(default)s).",
    )
    parser.add_argument(
        "--draft-vocab", type=int, nargs="+", default=[DEFAULT_DRAFT_VOCAB],
        help="Draft vocabulary sizes to run for each tree and lookup length; 0 is the whole vocabulary "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--combination", type=parse_combination, action="append",
        help="TREE:LOOKUP:VOCAB, one speculative method per --num-draft with that tree size, lookup length and draft "
        "vocabulary; repeat it for more methods. Replaces the product of --tree-size, --lookup-tokens and --draft-vocab.",
    )
    parser.add_argument("--tree-stats", help="eval_heads.json whose rank accuracies shape the trees (as caft generate).")
    parser.add_argument(
        "--calibration-questions", type=int, default=0,
        help="Before timing, decode this many --calibration-data questions with a chain of all heads and shape the "
        "trees from the rank rates measured there (overrides --tree-stats).",
    )
    parser.add_argument(
        "--calibration-data", default=DEFAULT_CALIBRATION,
        help="Questions for --calibration-questions, apart from the timed ones (default: %(default)s).",
    )
    parser.add_argument(
        "--calibration-start", type=int, default=1000,
        help="Index of the first calibration question; the default skips the 500 GSM8K training questions that "
        "experiments/distill_prompts.py gives the heads (default: %(default)s).",
    )
    parser.add_argument(
        "--recompute-questions", type=int, default=0,
        help="Also run the first N questions with --no-head-cache (heads recompute their keys and values).",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="Weight dtype of model and heads (default: %(default)s)."
    )
    parser.add_argument(
        "--kernels", default="both", choices=("default", "prepacked", "both"),
        help="Linear kernels of the speculative runs: PyTorch's default, oneDNN with prepacked weights "
        "(caft.generate.prepacked_linears, which also gets a plain-generate baseline), or both (default: %(default)s).",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--json-out", help="Write all measurements to this JSON file.")
    return parser.parse_args(argv)


def read_questions(path: str, count: int) -> list[str]:
    questions = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.strip():
                questions.append(json.loads(line)["question"])
            if len(questions) == count:
                break
    return questions


def plain_greedy(model, prompt: torch.Tensor, max_new_tokens: int, eos_token_id) -> list[int]:
    output = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    return output[0, prompt.shape[1]:].tolist()


def timed(function, *args, **kwargs):
    """Call `function`; return (its result, wall-clock seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Tally:
    """Tokens and seconds of one method, and of plain decoding on the same questions."""

    tokens: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    plain_tokens: int = 0
    plain_wall_s: float = 0.0
    plain_cpu_s: float = 0.0

    def ratios(self) -> tuple[float, float]:
        """Speed-up over plain decoding in wall-clock and in CPU time."""
        wall = (self.tokens / self.wall_s) / (self.plain_tokens / self.plain_wall_s)
        cpu = (self.tokens / self.cpu_s) / (self.plain_tokens / self.plain_cpu_s)
        return wall, cpu


def first_difference(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def time_block_forwards(model, prompt: list[int], context: int, sizes: list[int], repeats: int = 15) -> dict[int, float]:
    """Median seconds of one cached forward over blocks of `sizes` new tokens after `context` cached tokens."""
    from transformers import DynamicCache

    ids = (prompt * (context // len(prompt) + max(sizes) + 1))[: context + max(sizes)]
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([ids[:context]]), cache=cache, use_cache=True, logits_to_keep=1)
    timings = {}
    for size in sizes:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=torch.tensor([ids[context : context + size]]), cache=cache, use_cache=True)
            samples.append(time.perf_counter() - start)
            cache.crop(-size)
        timings[size] = statistics.median(samples)
    return timings


@dataclass
class Method:
    """One way of decoding: plain `model.generate` or speculative decoding, with default or prepacked linears."""

    name: str
    num_draft: int | None = None
    """None for plain `model.generate`."""
    tree: object = None
    """A caft.draft_tree.DraftTree, or None for chain drafting."""
    lookup_tokens: int = 0
    """Tokens of the prompt lookup branch per step (0: none)."""
    draft_vocab: int = 0
    """The heads draft token ids below this (0: the whole vocabulary)."""
    prepacked: bool = False
    head_cache: bool = True
    count: int = 0
    """Questions to run (the first ones)."""


def parse_combination(text: str) -> tuple[int, int, int]:
    """Parse a --combination value TREE:LOOKUP:VOCAB into three integers >= 0."""
    parts = text.split(":")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"--combination takes TREE:LOOKUP:VOCAB, three integers >= 0, like 4:4:16384; got {text!r}.")
    return int(parts[0]), int(parts[1]), int(parts[2])


def build_methods(args, num_heads: int, count: int) -> list[Method]:
    num_drafts = args.num_draft or [num_heads]
    combinations = args.combination or [
        (tree_size, lookup, draft_vocab)
        for tree_size in args.tree_size for lookup in args.lookup_tokens for draft_vocab in args.draft_vocab
    ]
    methods = []
    for prepacked in (False, True) if args.kernels == "both" else (args.kernels == "prepacked",):
        suffix = ", prepacked linears" if prepacked else ""
        if prepacked:
            methods.append(Method(f"plain generate{suffix}", prepacked=True, count=count))
        for num_draft in num_drafts:
            for tree_size, lookup, draft_vocab in combinations:
                tree = choose_tree(tree_size, args.tree_stats, args.heads, num_heads, num_draft, 0.0)
                shape = f"tree of {tree_size}" if tree is not None else "chain"
                name = (f"speculative, {num_draft} drafts, {shape}" + (f", lookup {lookup}" if lookup else "")
                        + (f", draft vocab {draft_vocab}" if draft_vocab else "") + suffix)
                methods.append(Method(name, num_draft, tree, lookup, draft_vocab, prepacked, count=count))
    if args.recompute_questions:
        last = methods[-1]
        methods.append(
            Method(f"{last.name}, no head cache", last.num_draft, last.tree, last.lookup_tokens, last.draft_vocab,
                   last.prepacked, False, args.recompute_questions)
        )
    return methods


def run_method(method: Method, model, heads, prompt: list[int], max_new_tokens: int, eos):
    """Decode one prompt; return (tokens, speculative stats or None, wall seconds, CPU seconds)."""
    with prepacked_linears(model, heads) if method.prepacked else contextlib.nullcontext():
        if method.num_draft is None:
            tokens, wall, cpu = timed(plain_greedy, model, torch.tensor([prompt]), max_new_tokens, eos)
            return tokens, None, wall, cpu
        result, wall, cpu = timed(
            speculative_generate, model, heads, prompt, max_new_tokens=max_new_tokens, num_draft=method.num_draft,
            head_cache=method.head_cache, tree=method.tree, lookup_tokens=method.lookup_tokens,
            draft_vocab=method.draft_vocab,
        )
        return result.tokens, result.stats, wall, cpu


def calibrate(args, model, heads, tokenizer, eos) -> str:
    """Measure the heads' rank rates on calibration questions (chain drafting); return the file written."""
    questions = read_questions(args.calibration_data, args.calibration_start + args.calibration_questions)
    calibration = [encode_prompt(tokenizer, question) for question in questions[args.calibration_start :]]
    if len(calibration) < args.calibration_questions:
        raise ValueError(f"{args.calibration_data} has only {len(calibration)} questions after --calibration-start.")
    total = SpeculativeStats()
    with prepacked_linears(model, heads) if args.kernels != "default" else contextlib.nullcontext():
        for prompt in calibration:
            total = total.merge(speculative_generate(model, heads, prompt, max_new_tokens=args.max_new_tokens, eos_token_id=eos).stats)
    path = str(Path(args.json_out or "spec_decoding.json").with_suffix(".tree_stats.json"))
    source = f"chain drafting on questions {args.calibration_start}-{args.calibration_start + len(calibration) - 1} of {args.calibration_data}"
    write_tree_stats(total, path, source)
    rates = ", ".join(f"head {k}: {row[0]:.2f}/{row[1]:.2f}/{row[2]:.2f}" for k, row in enumerate(total.rank_accuracy(), start=1))
    print(f"calibration on {len(calibration)} questions: rank 0/1/2 rates {rates}; written to {path}")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model_for_generation(args.model, args.dtype)
    heads = load_heads_for(model, args.heads)
    eos = model.generation_config.eos_token_id
    questions = read_questions(args.data, args.questions)
    prompts = [encode_prompt(tokenizer, question) for question in questions]
    if args.calibration_questions:
        args.tree_stats = calibrate(args, model, heads, tokenizer, eos)
    methods = build_methods(args, len(heads), len(prompts))
    print(f"{len(prompts)} questions from {args.data}; model {args.model}; heads {args.heads} ({heads.config.num_heads} x "
          f"{heads.config.arch}); {args.dtype}; max_new_tokens {args.max_new_tokens}; batch size 1; torch threads "
          f"{torch.get_num_threads()}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}")

    # Warm-up (not timed): first calls allocate and pick kernels.
    for method in methods:
        run_method(method, model, heads, prompts[0], 16, eos)

    plain = Tally()
    tallies = {method.name: Tally() for method in methods}
    totals = {method.name: SpeculativeStats() for method in methods}
    mismatches = {method.name: [] for method in methods}
    for index, prompt in enumerate(prompts):
        expected, _, wall, cpu = run_method(Method("plain generate"), model, heads, prompt, args.max_new_tokens, eos)
        plain.tokens, plain.wall_s, plain.cpu_s = plain.tokens + len(expected), plain.wall_s + wall, plain.cpu_s + cpu
        for method in methods:
            if index >= method.count:
                continue
            tokens, stats, method_wall, method_cpu = run_method(method, model, heads, prompt, args.max_new_tokens, eos)
            if stats is not None:
                totals[method.name] = totals[method.name].merge(stats)
            tally = tallies[method.name]
            tally.tokens += len(tokens)
            tally.wall_s += method_wall
            tally.cpu_s += method_cpu
            tally.plain_tokens += len(expected)
            tally.plain_wall_s += wall
            tally.plain_cpu_s += cpu
            position = first_difference(tokens, expected)
            if position is not None:
                mismatches[method.name].append((index, position))
        print(f"question {index + 1}/{len(prompts)}: {len(expected)} tokens, plain {len(expected) / wall:.1f} tokens/s, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)

    print(f"\nplain generate: {plain.tokens} tokens in {plain.wall_s:.1f} s = {plain.tokens / plain.wall_s:.2f} tokens/s "
          f"({plain.tokens / plain.cpu_s:.2f} tokens per CPU second)")
    results = {"settings": vars(args), "plain": asdict(plain), "methods": {}}
    for method in methods:
        tally, stats = tallies[method.name], totals[method.name]
        wall_ratio, cpu_ratio = tally.ratios()
        found = mismatches[method.name]
        identical = "identical" if not found else f"DIFFERENT in {len(found)} answers (question, first token): {found}"
        print(f"{method.name}: {tally.tokens / tally.wall_s:.2f} tokens/s, {wall_ratio:.2f}x plain wall-clock and "
              f"{cpu_ratio:.2f}x plain CPU time on the same {method.count} questions; outputs {identical}")
        results["methods"][method.name] = {**asdict(tally), "wall_ratio": wall_ratio, "cpu_ratio": cpu_ratio, "mismatches": found}
        plain_packed = next((other for other in methods if other.num_draft is None and other.prepacked), None)
        if method.num_draft is not None and method.prepacked and plain_packed is not None and method.count == plain_packed.count:
            # Against plain decoding with the same prepacked kernels: the gain of drafting alone.
            same_kernels = tallies[plain_packed.name]
            ratio = (tally.tokens / tally.wall_s) / (same_kernels.tokens / same_kernels.wall_s)
            print(f"    {ratio:.2f}x plain generate with the same prepacked linears (wall-clock)")
            results["methods"][method.name]["wall_ratio_same_kernels"] = ratio
        if method.num_draft is not None:
            print(f"    {stats.summary()}")
            results["methods"][method.name].update(
                tokens_per_forward=stats.tokens_per_forward, acceptance_by_head=stats.acceptance_by_head(),
                prefill_s=stats.prefill_s, verify_s=stats.verify_s, heads_s=stats.heads_s, steps=stats.steps,
                mean_block=stats.mean_block, lookup_steps=stats.lookup_steps, lookup_drafted=stats.lookup_drafted,
                lookup_accepted=stats.lookup_accepted,
            )

    context = len(prompts[0]) + 150
    # A lookup branch adds up to lookup_tokens nodes; the largest block is timed.
    block_sizes = sorted({1} | {
        (len(method.tree) if method.tree is not None else method.num_draft or 0) + method.lookup_tokens + 1 for method in methods
    })
    print()
    for prepacked in sorted({method.prepacked for method in methods}):
        label = "prepacked" if prepacked else "default"
        # caft generate verifies with grouped key/value heads in the attention kernel; the copying
        # path of transformers is timed for comparison.
        for grouped in (False, True):
            switch = grouped_attention_in_kernel(model) if grouped else contextlib.nullcontext()
            with prepacked_linears(model, heads) if prepacked else contextlib.nullcontext(), switch:
                timings = time_block_forwards(model, prompts[0], context, block_sizes)
            attention = "grouped heads in the kernel (as caft generate)" if grouped else "transformers' copied heads"
            print(f"one cached forward after {context} tokens, {label} linears, {attention}, by block size: " + ", ".join(
                f"{size}: {seconds * 1000:.1f} ms ({seconds / timings[1]:.2f}x)" for size, seconds in timings.items()
            ))
            results[f"forward_seconds_by_block_{label}" + ("_grouped_heads" if grouped else "")] = timings
    for method in methods:
        stats = totals[method.name]
        if method.num_draft is not None:
            drafts = stats.steps + stats.prompts  # the heads run once after the prefill and once per step
            print(f"{method.name}: {stats.verify_s / max(stats.steps, 1) * 1000:.1f} ms verification and "
                  f"{stats.heads_s / max(drafts, 1) * 1000:.1f} ms drafting per step")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
