"""Write the prompts of the self-distillation run in docs/results.md: GSM8K and MBPP training tasks.

    python experiments/distill_prompts.py --out runs/distill/prompts.jsonl
    caft distill --prompts runs/distill/prompts.jsonl --out runs/distill/distilled.jsonl --max-new-tokens 256
    python experiments/distill_prompts.py --split runs/distill/distilled.jsonl   # -> distilled_train/_eval.jsonl

Rows are OpenAI-style messages with one user turn: the first --gsm8k GSM8K training questions
and the MBPP training task texts (task ids 511-974), then shuffled with --seed. Only training
splits are used, so the GSM8K and MBPP test questions stay unseen by the heads.

`--split FILE` instead holds out a seeded --eval-fraction of the rows of a distilled file, so that
`caft train-heads -es` and `caft eval-heads --data` score the same held-out rows.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caft.assets import shared_data_dir  # noqa: E402


def build_prompts(data_dir: Path, gsm8k_rows: int) -> list[dict]:
    """Return the prompt rows in file order: GSM8K questions first, then MBPP task texts."""
    prompts = []
    with open(data_dir / "gsm8k" / "train.jsonl", encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if number > gsm8k_rows:
                break
            question = json.loads(line)["question"]
            prompts.append({"id": f"gsm8k-train-{number}", "messages": [{"role": "user", "content": question}]})
    with open(data_dir / "mbpp" / "mbpp.jsonl", encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            if 511 <= row["task_id"] <= 974:
                prompts.append({"id": f"mbpp-{row['task_id']}", "messages": [{"role": "user", "content": row["text"]}]})
    return prompts


def split_file(path: Path, fraction: float, seed: int) -> tuple[Path, Path]:
    """Write PATH's rows to <stem>_train.jsonl and <stem>_eval.jsonl; a seeded `fraction` goes to the second."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: round(fraction * len(lines))])
    outputs = path.with_name(f"{path.stem}_train.jsonl"), path.with_name(f"{path.stem}_eval.jsonl")
    for output, keep in zip(outputs, (False, True)):
        if output.exists():
            raise SystemExit(f"{output} exists; remove it or split another file")
        output.write_text("".join(line + "\n" for index, line in enumerate(lines) if (index in held_out) == keep), encoding="utf-8")
    return outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="Output .jsonl of prompts; an existing file is not overwritten.")
    parser.add_argument("--split", type=Path, help="Split this distilled .jsonl into train and held-out files instead.")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="Held-out share for --split (default: %(default)s).")
    parser.add_argument("--data-dir", type=Path, default=shared_data_dir(), help="Folder with gsm8k/ and mbpp/ (default: %(default)s).")
    parser.add_argument("--gsm8k", type=int, default=500, help="GSM8K training questions to take (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the shuffle (default: %(default)s).")
    args = parser.parse_args(argv)
    if args.split is not None:
        train, held_out = split_file(args.split, args.eval_fraction, args.seed)
        print(f"{args.split} -> {train}, {held_out}")
        return 0
    if args.out is None:
        parser.error("pass --out FILE to write prompts, or --split FILE to split a distilled file")
    if args.out.exists():
        parser.error(f"{args.out} exists; pass a new --out (caft distill resumes from its own output, not from this file)")
    prompts = build_prompts(args.data_dir, args.gsm8k)
    random.Random(args.seed).shuffle(prompts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in prompts), encoding="utf-8")
    print(f"{len(prompts)} prompts -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
