"""The original CAFT training script, run as `caft train` with the original defaults.

    torchrun --nproc-per-node 1 scripts/train.py -ftm lora
    torchrun --nproc-per-node 1 scripts/train.py -ftm lora -ft-heads -hpretrain
    torchrun --nproc-per-node 1 scripts/train.py -ftm sft -lr 5e-6 -fr-unembed
    torchrun --nproc-per-node 1 scripts/train.py -ftm sft -lr 5e-6 -fr-unembed -ft-heads -hpretrain
    python scripts/train.py --help

Data defaults to scripts/datasets/train_set.jsonl and eval_set.jsonl (see scripts/datasets/README.md).
The defaults and differences from the original are listed in caft/original.py.
"""

import os
import sys

# Python puts this script's folder first on sys.path, and its `datasets/` data folder would then hide the
# `datasets` package that transformers imports. Drop that entry before importing anything else.
_SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _SCRIPT_DIR]

from caft.original import TRAIN_SCRIPT, run_script

if __name__ == "__main__":
    sys.exit(run_script(TRAIN_SCRIPT, __file__))
