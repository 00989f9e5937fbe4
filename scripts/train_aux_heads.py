"""The original CAFT heads-training script, run as `caft train-heads` with the original defaults.

    torchrun --nproc-per-node 4 scripts/train_aux_heads.py
    python scripts/train_aux_heads.py --help

Data defaults to scripts/datasets/aux_head_train.jsonl and aux_head_eval.jsonl (see
scripts/datasets/README.md). The defaults are listed in caft/original.py.
"""

import os
import sys

# Python puts this script's folder first on sys.path, and its `datasets/` data folder would then hide the
# `datasets` package that transformers imports. Drop that entry before importing anything else.
_SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _SCRIPT_DIR]

from caft.original import HEADS_SCRIPT, run_script

if __name__ == "__main__":
    sys.exit(run_script(HEADS_SCRIPT, __file__))
