"""`caft eval-heads`: per-head top-1 and top-5 accuracy and loss of auxiliary heads on held-out conversations.

    caft eval-heads -model smollm2 --heads runs/heads/heads --data held_out.jsonl -maxlen 384 --out runs/heads/eval

Only labelled tokens count (the assistant tokens, as in training). Head k (k >= 1) predicts token
t+1+k from position t; head 0 is the base model's own next-token head, listed for scale.
Without --heads, the heads start as copies of the last decoder layer (the state before heads
training), which gives the baseline of a heads run.

Per head, `rank_accuracy` lists how often the target is the head's best, second best, ... token;
`caft generate` builds its draft tree from it (see caft/draft_tree.py).

Writes `eval_heads.json` and `eval_heads.png` (bar chart; needs matplotlib) into --out.
Logits are computed for one head and one chunk of positions at a time, so at most a
(chunk_size, V) tensor exists, never (B, T, V) for all heads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .loss import IGNORE_INDEX, head_targets
from .paths import check_output_folder

logger = logging.getLogger(__name__)

DEFAULT_NUM_HEADS = 4

TOP_K = 5
RANKS = 10
"""`rank_accuracy[r]` for r < RANKS: the share of targets that are the head's rank-r token (0 = its best)."""
RESULTS_NAME = "eval_heads.json"
CHART_NAME = "eval_heads.png"


def load_heads(model, heads_source: str | None, num_heads: int = DEFAULT_NUM_HEADS):
    """Attach heads to `model`: read from a heads folder or file, or new copies of the last layer when None."""
    from .heads import HeadsConfig, build_heads, infer_config_from_state, load_heads_state, read_heads_file
    from .model import add_auxiliary_heads

    if heads_source is None:
        heads = build_heads(model, HeadsConfig(num_heads=num_heads))
    else:
        config, state, source = read_heads_file(heads_source)
        heads = build_heads(model, config or infer_config_from_state(state))
        load_heads_state(heads, state, source)
    add_auxiliary_heads(model, heads=heads)
    return model


class HeadCounts:
    """Running sums of one head: token loss, targets, top-1 and top-k hits."""

    def __init__(self):
        self.loss_sum, self.targets, self.top1, self.topk = 0.0, 0, 0, 0
        self.rank_hits = [0] * RANKS

    def add(self, hidden: torch.Tensor, targets: torch.Tensor, unembed, chunk_size: int) -> None:
        """Score states `hidden` (B, S, H) against `targets` (B, S), skipping ignored targets, chunk by chunk."""
        rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        selected, valid_targets = hidden[rows, positions], targets[rows, positions]  # (N, H), (N,)
        for start in range(0, valid_targets.shape[0], chunk_size):
            chunk_targets = valid_targets[start : start + chunk_size]
            logits = unembed(selected[start : start + chunk_size]).float()  # (n, V)
            self.loss_sum += F.cross_entropy(logits, chunk_targets, reduction="sum").item()
            self.top1 += (logits.argmax(dim=-1) == chunk_targets).sum().item()
            best = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices  # (n, k)
            self.topk += (best == chunk_targets[:, None]).any(dim=-1).sum().item()
            # The rank of a target is the number of tokens with a higher logit (ties count in its favour).
            ranks = (logits > logits.gather(1, chunk_targets[:, None])).sum(dim=-1)
            for rank, hits in enumerate(torch.bincount(ranks.clamp(max=RANKS), minlength=RANKS + 1)[:RANKS].tolist()):
                self.rank_hits[rank] += hits
            self.targets += chunk_targets.shape[0]

    def result(self, head: int) -> dict:
        count = max(self.targets, 1)
        return {"head": head, "predicts": f"t+{head + 1}", "loss": self.loss_sum / count,
                "top1": self.top1 / count, f"top{TOP_K}": self.topk / count, "targets": self.targets,
                "rank_accuracy": [hits / count for hits in self.rank_hits]}


def evaluate_heads(model, rows: list[dict], collator, batch_size: int = 8, chunk_size: int = 512) -> list[dict]:
    """Return per head (0 = the model's own next-token head) the mean loss, top-1 and top-5 accuracy on `rows`.

    `model` carries heads (see `load_heads`); `rows` are tokenized examples with `input_ids` and `labels`.
    """
    from .heads import find_decoder
    from .model import make_unembed, run_heads, unwrap_causal_lm

    model = unwrap_causal_lm(model)
    num_heads = len(model.caft_heads)
    counts = [HeadCounts() for _ in range(num_heads + 1)]
    device = next(model.parameters()).device
    unembed = make_unembed(model)
    capture = model._caft_capture
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = {key: value.to(device) for key, value in collator(rows[start : start + batch_size]).items()}
            labels, position_ids = batch.pop("labels"), batch.get("position_ids")
            capture.active = True
            try:
                final_hidden = find_decoder(model)(**batch, use_cache=False).last_hidden_state  # (B, T, H)
                counts[0].add(final_hidden[:, :-1], head_targets(labels, 0, position_ids), unembed, chunk_size)
                for k, (hidden, own_head) in enumerate(run_heads(model, final_hidden), start=1):
                    targets = head_targets(labels, k, position_ids)  # (B, T-1-k)
                    head_unembed = make_unembed(model, own_head) if own_head is not None else unembed
                    counts[k].add(hidden[:, : targets.shape[1]], targets, head_unembed, chunk_size)
            finally:
                capture.clear()
    return [head_counts.result(k) for k, head_counts in enumerate(counts)]


def format_results(results: list[dict]) -> str:
    """Format the results as a plain-text table: one line per head with its target token, loss, top-1 and top-5."""
    lines = [f"{'head':>8}  {'predicts':>8}  {'loss':>7}  {'top-1':>6}  {f'top-{TOP_K}':>6}  {'targets':>8}"]
    for result in results:
        name = f"{result['head']}" + (" (base)" if result["head"] == 0 else "")
        lines.append(
            f"{name:>8}  {result['predicts']:>8}  {result['loss']:7.4f}  {result['top1']:6.3f}  "
            f"{result[f'top{TOP_K}']:6.3f}  {result['targets']:>8}"
        )
    return "\n".join(lines)


def plot_results(results: list[dict], path: Path, title: str) -> Path:
    """Draw top-1 and top-5 accuracy per head as grouped bars; raise ImportError with the fix without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("The bar chart needs matplotlib: pip install 'caft[plots]'.") from error

    heads = [result["head"] for result in results]
    labels = ["0 (base)" if k == 0 else str(k) for k in heads]
    width = 0.38
    figure, axis = plt.subplots(figsize=(1.2 * len(heads) + 2.5, 3.8))
    for offset, key, name in ((-width / 2, "top1", "top-1"), (width / 2, f"top{TOP_K}", f"top-{TOP_K}")):
        values = [result[key] for result in results]
        bars = axis.bar([k + offset for k in heads], values, width, label=name)
        axis.bar_label(bars, labels=[f"{value:.2f}" for value in values], fontsize=7, padding=1)
    axis.set_xticks(heads, labels)
    axis.set_xlabel("head (head k predicts token t+1+k)")
    axis.set_ylabel("accuracy on labelled tokens")
    axis.set_ylim(0, 1.05)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval-heads", help="Per-head top-1/top-5 accuracy and loss of auxiliary heads on held-out data.")
    parser.add_argument("--model", "-model", default="smollm2", help="Base model: hub id, folder, or 'smollm2' (default: %(default)s).")
    parser.add_argument("--heads", "-hdir", default=None,
                        help="Heads folder or file; without it, copies of the last decoder layer (the untrained baseline).")
    parser.add_argument(
        "--num-heads", type=int, default=DEFAULT_NUM_HEADS, help="Heads to build when --heads is not given (default: %(default)s)."
    )
    parser.add_argument("--data", required=True, help="Held-out conversations, .jsonl or .json, in any format caft reads.")
    parser.add_argument("--prompt-field", default=None, help="JSON field holding the prompt, for rows in no chat format.")
    parser.add_argument("--response-field", default=None, help="JSON field holding the reply, for rows in no chat format.")
    parser.add_argument("--size", "-sz", type=int, default=None, help="Use at most this many rows, after a seeded shuffle (default: all).")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the --size shuffle (default: %(default)s).")
    parser.add_argument("--model-max-length", "-maxlen", type=int, default=1024, help="Maximum tokens per row (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per forward pass (default: %(default)s).")
    parser.add_argument("--chunk-size", type=int, default=512, help="Positions unembedded at once per head (default: %(default)s).")
    parser.add_argument("--out", default=None, help="Folder for eval_heads.json and eval_heads.png (default: <heads>/eval, or ./eval-heads).")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="Model weight dtype (default: %(default)s).")
    parser.set_defaults(handler=_command_eval_heads)


def _default_out(heads: str | None) -> Path:
    if heads is None:
        return Path("eval-heads")
    path = Path(heads)
    return (path if path.is_dir() else path.parent) / "eval"


def _command_eval_heads(args: argparse.Namespace) -> int:
    from .chat import build_dataset
    from .collator import make_collator
    from .loading import load_model, load_tokenizer

    for name in ("batch_size", "chunk_size", "num_heads", "model_max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.heads and args.num_heads != DEFAULT_NUM_HEADS:
        logger.warning("--num-heads %d is ignored: the heads in %s decide their number.", args.num_heads, args.heads)
    out_dir = Path(args.out) if args.out else _default_out(args.heads)
    check_output_folder(out_dir)
    tokenizer = load_tokenizer(args.model)
    rows, stats = build_dataset(args.data, tokenizer, args.model_max_length, size=args.size, seed=args.seed,
                                prompt_field=args.prompt_field, response_field=args.response_field)
    logger.info("Held-out data %s: %s", args.data, stats.summary())
    model = load_heads(load_model(args.model, dtype=args.dtype), args.heads, args.num_heads)
    results = evaluate_heads(model, rows, make_collator(tokenizer), args.batch_size, args.chunk_size)

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "heads": args.heads or f"{args.num_heads} copies of the last decoder layer (untrained)",
              "data": args.data, "rows": len(rows), "data_stats": stats.__dict__, "max_length": args.model_max_length,
              "heads_results": results}
    (out_dir / RESULTS_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_results(results))
    print(f"results: {out_dir / RESULTS_NAME}")
    title = f"{Path(args.heads).name if args.heads else 'untrained heads'} on {Path(args.data).name} ({len(rows)} rows)"
    try:
        print(f"chart: {plot_results(results, out_dir / CHART_NAME, title)}")
    except ImportError as error:
        print(f"caft eval-heads: no chart written: {error}", file=sys.stderr)
    return 0

