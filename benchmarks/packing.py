"""Packing against one conversation per row: real tokens per second and optimizer steps per epoch.

    nice python benchmarks/packing.py              # 512 GSM8K conversations, SmolLM2, max length 512, batch 4, 6 steps
    python benchmarks/packing.py --size 64 --steps 2

Both variants fine-tune the same model with LoRA r=8 on all linear layers and 4 CAFT heads (the
`caft train` defaults) on the same tokenized conversations, with the same rows per micro-batch:
- `unpacked`: one conversation per row, the rows shuffled with the seed and each batch right-padded
  to its longest row, as `caft train` runs without --packing;
- `packed`: conversations packed into rows of up to --max-length tokens (caft.packing.pack_rows).
Each variant times --steps optimizer steps (one micro-batch each, after one warm-up step) on its
first batches, and the two variants take turns step by step, so both see the same load from other
jobs on the machine. The median step time is reported in wall-clock seconds and in CPU seconds of
the process. Real tokens are tokens that are not padding. Estimated epoch time = steps per epoch x median step time. Ratios are packed / unpacked.
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


class Variant:
    """One training setup under test: its batches, model, optimizer and the timings of its steps."""

    def __init__(self, args, name: str, rows: list[dict], collator):
        import random

        if name == "unpacked":
            rows = list(rows)
            random.Random(args.seed).shuffle(rows)
        self.name, self.rows, self.collator = name, rows, collator
        self.batches = [rows[start : start + args.batch] for start in range(0, len(rows), args.batch)]
        if len(self.batches) < args.steps + 1:
            raise SystemExit(f"{name}: only {len(self.batches)} batches; lower --steps or --batch, or raise --size.")
        self.model = build_model(args)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        self.times, self.cpu_times, self.tokens, self.slots = [], [], 0, 0

    def step(self, index: int, timed: bool) -> None:
        """Run one optimizer step on batch `index`, and record it when `timed`."""
        features = self.batches[index]
        batch = self.collator(features)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
        if not timed:
            return
        self.times.append(elapsed)
        self.cpu_times.append(cpu_elapsed)
        self.tokens += sum(len(row["input_ids"]) for row in features)
        self.slots += batch["input_ids"].numel()
        rows, width = batch["input_ids"].shape
        print(f"{self.name} step {index}: {elapsed:.2f} s wall, {cpu_elapsed:.2f} s CPU, {rows} x {width} tokens", flush=True)

    def result(self) -> dict:
        median = statistics.median(self.times)
        cpu_median = statistics.median(self.cpu_times)
        return {
            "variant": self.name,
            "rows": len(self.rows),
            "steps_per_epoch": len(self.batches),
            "median_step_s": round(median, 3),
            "median_step_cpu_s": round(cpu_median, 3),
            "real_tokens_per_s": round(self.tokens / sum(self.times), 1),
            "real_tokens_per_cpu_s": round(self.tokens / sum(self.cpu_times), 1),
            "padding_fraction": round(1 - self.tokens / self.slots, 4),
            "estimated_epoch_s": round(len(self.batches) * median, 1),
            "estimated_epoch_cpu_s": round(len(self.batches) * cpu_median, 1),
        }


def run_interleaved(variants: list[Variant], steps: int) -> None:
    """Warm up each variant with one step, then alternate their timed steps so both see the same machine load."""
    for variant in variants:
        variant.step(0, timed=False)  # the first step warms up allocators and caches
    for index in range(1, steps + 1):
        for variant in variants:
            variant.step(index, timed=True)


def cpu_name() -> str:
    """Return the CPU model name from /proc/cpuinfo (Linux), else the machine type."""
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
    variants = [Variant(args, "unpacked", rows, collator), Variant(args, "packed", packed, collator)]
    run_interleaved(variants, args.steps)
    results = [variant.result() for variant in variants]
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
