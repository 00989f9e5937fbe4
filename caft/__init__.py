"""caft: concept-aware fine-tuning of causal language models with auxiliary heads.

The original CAFT Python API:

    from caft import *
    add_auxiliary_heads(model)
    add_caft_loss(transformers)
    trainer = transformers.Trainer(model=model, args=args, callbacks=[CAFTSaveLogging],
                                   compute_metrics=caft_compute_metrics,
                                   preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                                   train_dataset=train, eval_dataset=held_out)
"""

from .heads import AuxiliaryHeads, HeadsConfig, build_heads, load_heads_state, read_heads_file, save_heads
from .loss import chunked_head_loss, count_targets, schedule_value
from .model import CAFTState, add_auxiliary_heads, remove_auxiliary_heads
from .trainer import CAFTSaveLogging, CAFTTrainer, add_caft_loss, caft_compute_metrics, preprocess_logits_for_metrics

__version__ = "0.1.0"

__all__ = [
    "AuxiliaryHeads",
    "CAFTSaveLogging",
    "CAFTState",
    "CAFTTrainer",
    "HeadsConfig",
    "add_auxiliary_heads",
    "add_caft_loss",
    "build_heads",
    "caft_compute_metrics",
    "chunked_head_loss",
    "count_targets",
    "load_heads_state",
    "preprocess_logits_for_metrics",
    "read_heads_file",
    "remove_auxiliary_heads",
    "save_heads",
    "schedule_value",
]
