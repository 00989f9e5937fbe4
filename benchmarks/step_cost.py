"""Step cost of CAFT against next-token fine-tuning: median step time and peak memory, as ratios.

    python benchmarks/step_cost.py                      # LoRA r=8, batch 4 x 256, half the positions labelled
    python benchmarks/step_cost.py --batch 1 --seq 1024
    python benchmarks/step_cost.py --full               # full fine-tuning with a frozen unembedding
    python benchmarks/step_cost.py --variants caft --heads-list 2 4 8    # memory against the number of heads

Each variant runs in its own process on the same model, batch and labels:
- `ntp_hf`: next-token fine-tuning with the transformers default loss (the baseline of every ratio),
- `ntp_caft`: next-token fine-tuning with caft's chunked loss (`--mode default`),
- `caft`: CAFT with caft's loss (chunked, fused for a frozen unembedding, checkpointed heads),
- `caft_stacked`: CAFT with every head's full logits stacked, the naive approach.
Peak memory is the process's peak RSS on CPU (`torch.cuda.max_memory_allocated` on GPU); the
training-only figure subtracts the RSS measured after the model was loaded and set up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("ntp_hf", "ntp_caft", "caft", "caft_stacked")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(args, variant: str, num_heads: int):
    import torch
    from peft import LoraConfig, get_peft_model

    from caft.loading import load_model
    from caft.model import add_auxiliary_heads
    from caft.train import lora_target_regex

    dtype = "bfloat16" if args.bf16 else "float32"
    model = load_model(args.model, dtype=dtype)
    model.config.use_cache = False
    if torch.cuda.is_available():
        model = model.cuda()
    if variant != "ntp_hf":
        add_auxiliary_heads(model, num_heads=num_heads if variant.startswith("caft") else 0)
        model.caft_state.mode = "caft" if variant.startswith("caft") else "default"
        model.caft_state.schedule_value = 1.0
        model.caft_state.chunk_size = args.chunk_size
    if args.full:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(not name.startswith("caft_heads."))
        model.get_output_embeddings().requires_grad_(False)
    else:
        target = lora_target_regex(model, ["all-linear"], include_heads=False)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target, task_type="CAUSAL_LM"))
    model.train()
    return model


def stacked_caft_loss(model, batch):
    """The naive CAFT loss: every head's full (B, T, V) logits stacked, then one cross-entropy per head."""
    import torch
    import torch.nn.functional as F

    from caft.heads import find_decoder
    from caft.loss import head_targets
    from caft.model import make_unembed, run_heads, unwrap_causal_lm

    causal_lm = unwrap_causal_lm(model)
    state = causal_lm.caft_state
    capture = causal_lm._caft_capture
    capture.active = True
    final_hidden = find_decoder(causal_lm)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    unembed = make_unembed(causal_lm)
    hidden_per_head = [final_hidden] + [hidden for hidden, _ in run_heads(causal_lm, final_hidden)]
    capture.clear()
    logits = torch.stack([unembed(hidden).float() for hidden in hidden_per_head])  # (heads + 1, B, T, V)
    weights = state.weights(len(hidden_per_head) - 1)
    loss = 0.0
    for k, weight in enumerate(weights):
        targets = head_targets(batch["labels"], k)
        head_logits = logits[k, :, : targets.shape[1]]
        loss = loss + weight * F.cross_entropy(head_logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    return loss


def run_child(args) -> dict:
    import torch

    torch.manual_seed(0)
    num_heads = args.heads
    model = build_model(args, args.child, num_heads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else 49152
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator)
    labels = input_ids.clone()
    labels[:, : args.seq // 2] = -100  # the prompt half is not trained
    batch = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rss_after_setup = current_rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_allocated = torch.cuda.memory_allocated() / 2**20

    times = []
    for step in range(args.steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if args.child == "caft_stacked":
            loss = stacked_caft_loss(model, batch)
        else:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # step 0 warms up allocators and caches
            times.append(time.perf_counter() - start)
    result = {"variant": args.child, "heads": num_heads, "median_step_s": statistics.median(times), "loss": float(loss)}
    if device == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["train_mb"] = result["peak_mb"] - base_allocated
    else:
        result["peak_mb"] = peak_rss_mb()
        result["train_mb"] = peak_rss_mb() - rss_after_setup
    return result


def arithmetic_ratio(model_name: str, heads: int, labelled_fraction: float) -> float:
    """Multiply-adds per token of CAFT over a next-token step, from the model's shapes.

    Next-token: every decoder layer and the unembedding at every position (the transformers default).
    CAFT adds per head one decoder layer at every position and one unembedding at the labelled positions.
    Attention score arithmetic is left out.
    """
    from transformers import AutoConfig

    from caft.assets import resolve_model_name

    config = AutoConfig.from_pretrained(resolve_model_name(model_name)).get_text_config()
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    layer = hidden * (hidden + 2 * kv + hidden) + 3 * hidden * inter
    unembed = hidden * config.vocab_size
    next_token = config.num_hidden_layers * layer + unembed
    caft = next_token + heads * (layer + labelled_fraction * unembed)
    return caft / next_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps after one warm-up step.")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--heads-list", type=int, nargs="+", help="Run the caft variants once per number of heads.")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--full", action="store_true", help="Full fine-tuning (frozen unembedding) instead of LoRA r=8.")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="Also write the results to this file.")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return

    runs = []
    for variant in args.variants:
        heads_values = args.heads_list if (args.heads_list and variant.startswith("caft")) else [args.heads]
        for heads in heads_values:
            command = [sys.executable, __file__, "--child", variant, "--model", args.model, "--batch", str(args.batch),
                       "--seq", str(args.seq), "--steps", str(args.steps), "--heads", str(heads),
                       "--chunk-size", str(args.chunk_size)]
            command += ["--full"] if args.full else []
            command += ["--bf16"] if args.bf16 else []
            output = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
            if output.returncode != 0 or not lines:
                print(f"{variant} ({heads} heads) failed:\n{output.stderr[-2000:]}", file=sys.stderr)
                continue
            runs.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"done: {variant} heads={heads}", file=sys.stderr, flush=True)

    method = "full (frozen unembedding)" if args.full else "LoRA r=8"
    print(f"\nmodel {args.model}, {method}, batch {args.batch} x {args.seq}, half the positions labelled, "
          f"{'bf16' if args.bf16 else 'fp32'}, median of {args.steps} steps")
    print(f"arithmetic ratio CAFT / next-token ({args.heads} heads): "
          f"{arithmetic_ratio(args.model, args.heads, 0.5):.2f}x")
    baseline = next((run for run in runs if run["variant"] == "ntp_hf"), runs[0] if runs else None)
    print(f"{'variant':<14}{'heads':>6}{'step s':>9}{'time x':>8}{'peak MiB':>10}{'peak x':>8}{'train MiB':>11}{'train x':>9}")
    for run in runs:
        print(f"{run['variant']:<14}{run['heads']:>6}{run['median_step_s']:>9.3f}"
              f"{run['median_step_s'] / baseline['median_step_s']:>8.2f}{run['peak_mb']:>10.0f}"
              f"{run['peak_mb'] / baseline['peak_mb']:>8.2f}{run['train_mb']:>11.0f}"
              f"{run['train_mb'] / max(baseline['train_mb'], 1):>9.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "runs": runs}, handle, indent=2)


if __name__ == "__main__":
    main()
