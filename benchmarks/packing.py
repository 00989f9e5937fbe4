"""Packing against one conversation per row: real tokens per second and optimizer steps per epoch.

    nice python benchmarks/packing.py              # 512 GSM8K conversations, SmolLM2, max length 512, batch 4, 6 steps
    python benchmarks/packing.py --size 64 --steps 2

Both variants fine-tune the same model with LoRA r=8 on all linear layers and 4 CAFT heads (the
`caft train` defaults) on the same tokenized conversations, with the same rows per micro-batch:
- `unpacked`: one conversation per row, the rows shuffled with the seed and each batch right-padded
  to its longest row, as `caft train` runs without --packing;
- `packed`: conversations packed into rows of up to --max-length tokens (caft.packing.pack_rows).
Each variant times --steps optimizer steps (one micro-batch each, after one warm-up step) on its
first batches and reports the median step time, in wall-clock seconds and in CPU seconds of the
process (the steadier figure when other jobs share the CPU). Real tokens are tokens that are not
padding. Estimated epoch time = steps per epoch x median step time. Ratios are packed / unpacked.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def tokenized_conversations(args):
    from caft.chat import build_dataset
    from caft.loading import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    rows, _ = build_dataset(
        args.data, tokenizer, args.max_length, size=args.size, seed=args.seed,
        prompt_field="question", response_field="answer",
    )
    return tokenizer, rows


def build_model(args):
    from peft import LoraConfig, get_peft_model

    from caft.loading import load_model
    from caft.model import add_auxiliary_heads
    from caft.train import lora_target_regex

    torch.manual_seed(args.seed)
    model = load_model(args.model)
    model.config.use_cache = False
    add_auxiliary_heads(model, num_heads=args.heads)
    model.caft_state.schedule_value = 1.0
    target = lora_target_regex(model, ["all-linear"], include_heads=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target, task_type="CAUSAL_LM"))
    model.train()
    return model


def time_variant(args, name: str, rows: list[dict], collator) -> dict:
    """Run warm-up + --steps optimizer steps on the first batches of `rows`; return timings and counts."""
    import random

    if name == "unpacked":
        rows = list(rows)
        random.Random(args.seed).shuffle(rows)
    batches = [rows[start : start + args.batch] for start in range(0, len(rows), args.batch)]
    if len(batches) < args.steps + 1:
        raise SystemExit(f"{name}: only {len(batches)} batches; lower --steps or --batch, or raise --size.")

    model = build_model(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times, cpu_times, tokens, slots = [], [], 0, 0
    for step, features in enumerate(batches[: args.steps + 1]):
        batch = collator(features)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
        if step == 0:
            continue  # the first step warms up allocators and caches
        times.append(elapsed)
        cpu_times.append(cpu_elapsed)
        tokens += sum(len(row["input_ids"]) for row in features)
        slots += batch["input_ids"].numel()
        shape = tuple(batch["input_ids"].shape)
        print(f"{name} step {step}: {elapsed:.2f} s wall, {cpu_elapsed:.2f} s CPU, {shape[0]} x {shape[1]} tokens", flush=True)

    median = statistics.median(times)
    cpu_median = statistics.median(cpu_times)
    return {
        "variant": name,
        "rows": len(rows),
        "steps_per_epoch": len(batches),
        "median_step_s": round(median, 3),
        "median_step_cpu_s": round(cpu_median, 3),
        "real_tokens_per_s": round(tokens / sum(times), 1),
        "real_tokens_per_cpu_s": round(tokens / sum(cpu_times), 1),
        "padding_fraction": round(1 - tokens / slots, 4),
        "estimated_epoch_s": round(len(batches) * median, 1),
        "estimated_epoch_cpu_s": round(len(batches) * cpu_median, 1),
    }


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else the platform's machine type."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="/work/shared/data/gsm8k/train.jsonl",
                        help="JSONL file with question and answer fields (default: the GSM8K training split).")
    parser.add_argument("--size", type=int, default=512, help="Conversations to use (default: %(default)s).")
    parser.add_argument("--max-length", type=int, default=512, help="Tokens per conversation and per packed row.")
    parser.add_argument("--batch", type=int, default=4, help="Rows per step in both variants (default: %(default)s).")
    parser.add_argument("--steps", type=int, default=6, help="Timed steps after one warm-up step (default: %(default)s).")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args()

    from caft.collator import make_collator
    from caft.packing import pack_rows

    tokenizer, rows = tokenized_conversations(args)
    packed, stats = pack_rows(rows, args.max_length, seed=args.seed)
    print(f"{len(rows)} conversations; packed: {stats.summary()}", flush=True)
    collator = make_collator(tokenizer)
    results = [time_variant(args, "unpacked", rows, collator), time_variant(args, "packed", packed, collator)]
    baseline, packed_result = results
    ratios = {
        "tokens_per_s": round(packed_result["real_tokens_per_s"] / baseline["real_tokens_per_s"], 2),
        "tokens_per_cpu_s": round(packed_result["real_tokens_per_cpu_s"] / baseline["real_tokens_per_cpu_s"], 2),
        "steps_per_epoch": round(packed_result["steps_per_epoch"] / baseline["steps_per_epoch"], 3),
        "epoch_time": round(packed_result["estimated_epoch_s"] / baseline["estimated_epoch_s"], 3),
        "epoch_cpu_time": round(packed_result["estimated_epoch_cpu_s"] / baseline["estimated_epoch_cpu_s"], 3),
    }

    print(f"\nmachine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print("| variant | rows | steps/epoch | padding | median step (s wall / s CPU) | real tokens/s (wall / CPU) "
          "| est. epoch (s wall / s CPU) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['variant']} | {r['rows']} | {r['steps_per_epoch']} | {r['padding_fraction']:.1%} | "
              f"{r['median_step_s']} / {r['median_step_cpu_s']} | {r['real_tokens_per_s']} / {r['real_tokens_per_cpu_s']} | "
              f"{r['estimated_epoch_s']} / {r['estimated_epoch_cpu_s']} |")
    print(f"packing efficiency {stats.efficiency:.1%}; packed / unpacked: {ratios}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "packing_efficiency": stats.efficiency, "results": results,
                       "ratios": ratios}, handle, indent=2)


if __name__ == "__main__":
    main()
