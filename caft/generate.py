"""Self-speculative decoding: the auxiliary heads draft tokens and the model verifies them in one forward pass.

    caft generate -model runs/my-run --heads runs/my-run/heads --prompt "What is 12 * 7?" --stream

Each step feeds the model a block `[t0, d1, ..., dn]`: t0 is the model's own next token and d_k is
the draft of head k, computed from the state at the position before t0 (head k predicts token
t+1+k). One forward pass with the KV cache gives the model's distribution after every block
token. The longest prefix of drafts that the model agrees with is kept, the model's token after
that prefix becomes the next t0, and the rejected positions are cropped from the KV cache.

Greedy decoding (temperature 0) accepts a draft when it equals the model's argmax, so the output
is the output of `model.generate(do_sample=False)` up to floating-point differences between a
block forward and a one-token forward. Sampling (temperature > 0) uses the speculative sampling
rule of Leviathan et al. 2023 and Chen et al. 2023, with each head's distribution as the draft
distribution: draft d is accepted with probability min(1, p(d) / q(d)), and after a rejection
the token is drawn from max(0, p - q) normalised. The tokens then follow the model's own
temperature-scaled distribution (no top-k or top-p).

With greedy decoding, the drafts can also form a tree (caft/draft_tree.py): several candidates
per head, plus a branch from prompt lookup (caft/lookup.py), all verified in one forward pass.

Transformer heads are attention layers that need keys and values for every earlier position.
Each head layer keeps its own KV cache (`head_cache=True`, the default) or recomputes them from
the stored last-layer inputs at every step (`head_cache=False`, slower, kept for comparison).
Batch size 1 only.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import DynamicSlidingWindowLayer

from .draft_tree import DraftTree, ancestor_mask, attach_chain
from .eval_heads import RANKS
from .grouped_attention import grouped_attention_in_kernel
from .heads import AuxiliaryHeads, build_heads, find_decoder_layers, find_final_norm, load_heads_state, read_heads_file
from .kv_cache import ReservedLayer, reserved_cache
from .lookup import NgramLookup
from .model import make_unembed, unwrap_causal_lm

logger = logging.getLogger(__name__)

DEFAULT_DRAFT_VOCAB = 16384
"""Token ids the heads draft from in `caft generate` (0: all).

BPE vocabularies number their tokens from the most frequent merges on, so the low ids cover most
text. With 16,384 ids, the heads' unembedding reads a third of SmolLM2's 49,152-row matrix per step.
"""


@dataclass
class SpeculativeStats:
    """Counters of one or more speculative generations. Times are wall-clock seconds."""

    prompts: int = 0
    new_tokens: int = 0
    forwards: int = 0
    """Model forward passes: one prefill per prompt plus one per verification step."""
    steps: int = 0
    """Verification steps (forward passes over a block of proposed tokens)."""
    accepted_drafts: int = 0
    block_tokens: int = 0
    """Tokens fed to the verification forwards: the model's token plus every draft or tree node."""
    reached: list[int] = field(default_factory=list)
    """Per head k (index k-1): steps in which draft k was checked, i.e. drafts 1..k-1 were accepted."""
    accepted: list[int] = field(default_factory=list)
    """Per head k: steps in which draft k was accepted."""
    rank_hits: list[list[int]] = field(default_factory=list)
    """Per head k and rank r < RANKS: greedy steps reaching draft k whose model token was head k's rank-r token."""
    lookup_tokens: int = 0
    """The prompt lookup length in use (0: off)."""
    lookup_steps: int = 0
    """Steps in which prompt lookup added tokens that the heads' tree did not hold (caft/lookup.py)."""
    lookup_drafted: int = 0
    """Tokens proposed by prompt lookup that the heads' tree did not already hold."""
    lookup_accepted: int = 0
    """Accepted tokens that only prompt lookup had proposed."""
    prefill_s: float = 0.0
    verify_s: float = 0.0
    heads_s: float = 0.0
    total_s: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens committed per model forward pass (1.0 for plain decoding)."""
        return self.new_tokens / max(self.forwards, 1)

    @property
    def mean_accepted_drafts(self) -> float:
        return self.accepted_drafts / max(self.steps, 1)

    @property
    def mean_block(self) -> float:
        """Mean tokens per verification forward."""
        return self.block_tokens / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def count_rank(self, head_index: int, head_logits: torch.Tensor, model_token: int) -> None:
        """Count the rank of the model's token among head `head_index + 1`'s logits (0 = the head's best)."""
        if head_logits[model_token] == float("-inf"):
            return  # outside the draft vocabulary: the head could not have drafted it
        rank = int((head_logits > head_logits[model_token]).sum())
        if rank < RANKS:
            self.rank_hits[head_index][rank] += 1

    def rank_accuracy(self) -> list[list[float]]:
        """Per head k: the share of steps reaching draft k whose model token was head k's rank-r token.

        These are the rates of caft.draft_tree measured where they matter: at the steps where the
        drafts before k were accepted. `caft generate --save-tree-stats` writes them.
        """
        return [[hits / reached if reached else 0.0 for hits in row] for row, reached in zip(self.rank_hits, self.reached)]

    def acceptance_by_head(self) -> list[float]:
        """Per head k: the fraction of checked drafts that were accepted (NaN when never checked)."""
        return [a / r if r else float("nan") for a, r in zip(self.accepted, self.reached)]

    def merge(self, other: SpeculativeStats) -> SpeculativeStats:
        size = max(len(self.reached), len(other.reached))
        pad = lambda values, fill=0: values + [fill] * (size - len(values))  # noqa: E731
        return SpeculativeStats(
            prompts=self.prompts + other.prompts,
            new_tokens=self.new_tokens + other.new_tokens,
            forwards=self.forwards + other.forwards,
            steps=self.steps + other.steps,
            accepted_drafts=self.accepted_drafts + other.accepted_drafts,
            block_tokens=self.block_tokens + other.block_tokens,
            reached=[a + b for a, b in zip(pad(self.reached), pad(other.reached))],
            accepted=[a + b for a, b in zip(pad(self.accepted), pad(other.accepted))],
            rank_hits=[
                [a + b for a, b in zip(mine, theirs)]
                for mine, theirs in zip(pad(self.rank_hits, [0] * RANKS), pad(other.rank_hits, [0] * RANKS))
            ],
            lookup_tokens=max(self.lookup_tokens, other.lookup_tokens),
            lookup_steps=self.lookup_steps + other.lookup_steps,
            lookup_drafted=self.lookup_drafted + other.lookup_drafted,
            lookup_accepted=self.lookup_accepted + other.lookup_accepted,
            prefill_s=self.prefill_s + other.prefill_s,
            verify_s=self.verify_s + other.verify_s,
            heads_s=self.heads_s + other.heads_s,
            total_s=self.total_s + other.total_s,
        )

    def summary(self) -> str:
        rates = ", ".join(
            f"head {k}: " + ("not reached" if math.isnan(rate) else f"{rate:.2f}")
            for k, rate in enumerate(self.acceptance_by_head(), start=1)
        )
        lookup = ""
        if self.lookup_steps:
            lookup = (
                f"prompt lookup proposed new tokens in {self.lookup_steps} steps, {self.lookup_accepted} of its "
                f"{self.lookup_drafted} tokens accepted; "
            )
        elif self.lookup_tokens and self.steps:
            lookup = "prompt lookup found nothing the heads had not proposed; "
        steps = f"{self.steps} step" + ("" if self.steps == 1 else "s")
        return (
            f"{self.new_tokens} new tokens in {self.total_s:.2f} s ({self.tokens_per_s:.1f} tokens/s); "
            f"{self.tokens_per_forward:.2f} tokens per model forward, {self.mean_accepted_drafts:.2f} accepted drafts "
            f"per step over {steps} (blocks of {self.mean_block:.1f} tokens); acceptance by head ({rates or 'no drafts'}); "
            f"{lookup}time: prefill {self.prefill_s:.2f} s, verification {self.verify_s:.2f} s, heads {self.heads_s:.2f} s"
        )


@dataclass
class GenerationResult:
    tokens: list[int]
    """The new tokens, ending with an end-of-sequence token when one was generated."""
    stats: SpeculativeStats


class _LastLayerCapture:
    """Hooks that record the last decoder layer's inputs and output and the final norm's output.

    The heads read exactly these tensors: transformer heads in `sibling` wiring take the last
    layer's inputs, `reference` wiring takes the final norm's output, linear heads the last
    layer's output. The hooks are removed on exit.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.output: torch.Tensor | None = None
        self.final_hidden: torch.Tensor | None = None

    def __enter__(self) -> _LastLayerCapture:
        last_layer = find_decoder_layers(self.model)[-1]
        self.hooks = [
            last_layer.register_forward_pre_hook(self._save_inputs, with_kwargs=True),
            last_layer.register_forward_hook(self._save_output),
            find_final_norm(self.model).register_forward_hook(self._save_final_hidden),
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        for hook in self.hooks:
            hook.remove()

    def _save_inputs(self, module, args, kwargs):
        self.args, self.kwargs = args, kwargs

    def _save_output(self, module, args, output):
        self.output = output[0] if isinstance(output, tuple) else output

    def _save_final_hidden(self, module, args, output):
        self.final_hidden = output

    def layer_inputs(self) -> tuple[torch.Tensor, tuple, dict]:
        """Return (hidden states, other positional args, kwargs) of the last decoder layer's call."""
        if self.args:
            return self.args[0], tuple(self.args[1:]), dict(self.kwargs)
        kwargs = dict(self.kwargs)
        return kwargs.pop("hidden_states"), (), kwargs


def _with_cache(args: tuple, kwargs: dict, cache) -> tuple[tuple, dict]:
    """Return copies of a decoder layer's args and kwargs with every KV cache object replaced by `cache`."""
    from transformers import Cache

    found = False
    new_args = []
    for value in args:
        if isinstance(value, Cache):
            value, found = cache, True
        new_args.append(value)
    new_kwargs = {}
    for name, value in kwargs.items():
        if isinstance(value, Cache):
            value, found = cache, True
        new_kwargs[name] = value
    if not found:
        raise ValueError("The last decoder layer was called without a KV cache object, so the heads cannot keep their own.")
    return tuple(new_args), new_kwargs


class HeadDrafter:
    """Runs heads 1..num_draft on the captured states of each block and returns their logits at one position.

    With `use_cache`, every layer of every head has its own DynamicCache, cropped in step with
    the model's cache. A copied layer keeps the last layer's `layer_idx`, so one cache per head
    layer avoids collisions. Without `use_cache`, the inputs of every earlier block are stored
    and replayed through fresh caches at each step (the recomputation baseline).

    With `draft_vocab` N, the heads' logits are computed for token ids below N only and the others
    get -inf, so the heads never draft them. Only the model decides what is accepted, so this
    changes speed, never the output.
    """

    def __init__(self, model: nn.Module, heads: AuxiliaryHeads, num_draft: int, use_cache: bool = True,
                 draft_vocab: int | None = None):
        self.model = model
        self.draft_vocab = draft_vocab
        self.config = heads.config
        self.heads = list(heads.heads)[:num_draft]
        self.norm = find_final_norm(model)
        self.unembeds = [make_unembed(model, getattr(head, "lm_head", None)) for head in self.heads]
        self.shared_unembed = make_unembed(model)
        self.use_cache = use_cache
        self.history: list[tuple[torch.Tensor, tuple, dict, int]] = []
        self.caches = [self._new_caches(head) for head in self.heads]

    def _new_caches(self, head) -> list:
        return [reserved_cache(self.model.config) for _ in head.layers]

    def draft_logits(self, capture: _LastLayerCapture, row: int) -> list[torch.Tensor]:
        """Return each head's logits (V,) at block position `row`; forget the block positions after it."""
        if self.config.arch == "linear":
            index = row % capture.output.shape[1]
            hidden = capture.output[:, index : index + 1]
            return self._unembed([self.norm(head.forward_layers(hidden, (), {})) for head in self.heads])

        layer_hidden, args, kwargs = capture.layer_inputs()
        if self.config.wiring == "reference":
            layer_hidden = capture.final_hidden
        index = row % layer_hidden.shape[1]
        return self._layer_logits(layer_hidden, args, kwargs, index)

    def draft_logits_path(self, capture: _LastLayerCapture, path: list[int], past: int) -> list[torch.Tensor]:
        """Return each head's logits (V,) after the tree nodes `path` (block positions) that the model accepted.

        The heads see the accepted nodes as a plain sequence after the `past` cached positions: their
        states, rotary embeddings and position ids are gathered from the tree block, and a causal mask
        replaces the tree mask.
        """
        if self.config.arch == "linear":
            return self.draft_logits(capture, path[-1])
        layer_hidden, args, kwargs = capture.layer_inputs()
        if self.config.wiring == "reference":
            layer_hidden = capture.final_hidden
        index = torch.tensor(path, dtype=torch.long, device=layer_hidden.device)
        layer_hidden = layer_hidden.index_select(1, index)
        kwargs = _path_kwargs(_named_arguments(self.heads[0].layers[0], args, kwargs), index, past, layer_hidden.dtype)
        return self._layer_logits(layer_hidden, (), kwargs, len(path) - 1)

    def _layer_logits(self, layer_hidden: torch.Tensor, args: tuple, kwargs: dict, index: int) -> list[torch.Tensor]:
        """Run the head layers over `layer_hidden`, keep their caches up to `index` and return the logits there."""
        to_remove = layer_hidden.shape[1] - 1 - index
        if not self.use_cache:
            self.caches = [self._new_caches(head) for head in self.heads]
            for old_hidden, old_args, old_kwargs, old_remove in self.history:
                self._run_layers(old_hidden, old_args, old_kwargs, old_remove)
            self.history.append((layer_hidden, args, kwargs, to_remove))
        outputs = [output[:, index : index + 1] for output in self._run_layers(layer_hidden, args, kwargs, to_remove)]
        if self.config.wiring != "reference":
            outputs = [self.norm(output) for output in outputs]
        return self._unembed(outputs)

    def _unembed(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Map each head's (1, 1, H) state to logits (V,); heads sharing lm_head go through it in one matmul."""
        if self.config.separate_unembed:
            return [
                self._logits_in_draft_vocab(unembed, hidden)[0, -1] for hidden, unembed in zip(hidden_states, self.unembeds)
            ]
        if not hidden_states:
            return []
        # One (1, n, H) x (H, V) product reads the unembedding weight once instead of n times.
        return list(self._logits_in_draft_vocab(self.shared_unembed, torch.cat(hidden_states, dim=1))[0])

    def _logits_in_draft_vocab(self, unembed, hidden: torch.Tensor) -> torch.Tensor:
        """Return unembed(hidden), computed over the draft vocabulary only when one is set and lm_head is a plain Linear."""
        module = unembed.module
        if not self.draft_vocab or type(module) is not nn.Linear or self.draft_vocab >= module.out_features:
            return unembed(hidden)
        rows = slice(0, self.draft_vocab)
        logits = nn.functional.linear(hidden, module.weight[rows], None if module.bias is None else module.bias[rows])
        if unembed.softcap:
            logits = torch.tanh(logits / unembed.softcap) * unembed.softcap
        full = logits.new_full((*logits.shape[:-1], module.out_features), float("-inf"))
        full[..., rows] = logits
        return full

    def _run_layers(self, hidden: torch.Tensor, args: tuple, kwargs: dict, to_remove: int) -> list[torch.Tensor]:
        outputs = []
        for head, caches in zip(self.heads, self.caches):
            state = hidden
            for layer, cache in zip(head.layers, caches):
                layer_args, layer_kwargs = _with_cache(args, kwargs, cache)
                output = layer(state, *layer_args, **layer_kwargs)
                state = output[0] if isinstance(output, tuple) else output
                record_past_after_prefill(cache)
                crop_cache(cache, to_remove)
            outputs.append(state)
        return outputs


def _named_arguments(layer: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Return the layer's positional arguments after the hidden states as keyword arguments (GPT-2 passes the mask so)."""
    if not args:
        return dict(kwargs)
    names = [name for name in inspect.signature(layer.forward).parameters if name not in ("self", "args", "kwargs")]
    return {**dict(zip(names[1:], args)), **kwargs}


def _path_kwargs(kwargs: dict, index: torch.Tensor, past: int, dtype: torch.dtype) -> dict:
    """Turn the last layer's kwargs for a tree block into those of the accepted path `index` after `past` positions."""
    from transformers import Cache

    path_kwargs = {}
    for name, value in kwargs.items():
        if name == "position_embeddings" and isinstance(value, tuple):
            value = tuple(part.index_select(1, index) for part in value)
        elif name == "attention_mask":
            value = causal_block_mask(index.numel(), past, dtype, index.device)
        elif name == "position_ids" and isinstance(value, torch.Tensor):
            value = value.index_select(value.dim() - 1, index)
        elif name == "cache_position" and isinstance(value, torch.Tensor):
            # Cache slots, not token positions: the path fills the slots right after the past.
            value = torch.arange(past, past + index.numel(), dtype=value.dtype, device=value.device)
        elif isinstance(value, torch.Tensor) and not isinstance(value, Cache):
            raise ValueError(
                f"Tree drafting does not know how to follow the last decoder layer's argument {name!r} along a path; "
                "use chain drafting without prompt lookup (--tree-size 0 --lookup-tokens 0)."
            )
        path_kwargs[name] = value
    return path_kwargs


def causal_block_mask(length: int, past: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Return a (1, 1, length, past + length) additive mask.

    Each new position attends to the past and to the new positions up to itself.
    """
    mask = torch.zeros(1, 1, length, past + length, dtype=dtype, device=device)
    mask[0, 0, :, past:] = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask


def drafting_support(model: nn.Module) -> str:
    """Return "tree" when every cache layer of `model` is full attention, "chain" when some are sliding-window.

    A tree block keeps only its accepted branch, which `keep_cache_positions` moves within each
    layer's keys. Sliding-window layers keep a window of keys that this cannot rearrange, so models
    with them decode with chain drafting only, and without prompt lookup. Other layers (linear
    attention, for example) cannot be cropped back after rejected drafts: ValueError.
    """
    kinds = {type(layer) for layer in reserved_cache(model.config).layers}
    other = sorted(kind.__name__ for kind in kinds - {ReservedLayer, DynamicSlidingWindowLayer})
    if other:
        raise ValueError(
            f"{type(model).__name__} has KV cache layers of type {', '.join(other)}, which speculative decoding "
            "cannot crop back after rejected drafts; only models with full or sliding-window attention are supported."
        )
    return "chain" if DynamicSlidingWindowLayer in kinds else "tree"


def record_past_after_prefill(cache) -> None:
    """Let the sliding-window layers of `cache` keep the keys of blocks that may be cropped (no-op for other layers).

    Without it, a sliding-window layer that has filled its window drops the oldest keys at every
    forward and cannot be cropped back. With it, each layer keeps a block's keys until the next
    `crop`, which then trims the layer to its window, so every forward after the first must be
    followed by a crop (crop(0) when nothing is rejected). Switching on after the prompt's forward
    keeps a long prompt from being held whole, as transformers' own assisted decoding does.
    """
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer and not layer.record_past:
            layer.activate_past_recording()


def crop_cache(cache, tokens_to_remove: int) -> None:
    """Drop the last `tokens_to_remove` positions from every layer of `cache` that has keys.

    Called after every forward, also with 0, because that crop trims a recording sliding-window
    layer back to its window. Layers without keys yet (those of a head's cache that only the head
    layer's index uses) are skipped, since transformers' sliding-window crop fails on them.
    """
    for layer in cache.layers:
        if layer.is_initialized:
            layer.crop(-tokens_to_remove)  # transformers 5 takes minus the number of positions to drop


def keep_cache_positions(cache, start: int, offsets: list[int]) -> None:
    """Keep the cached positions `start + offsets[i]` (offsets increasing) at `start + i` and drop the rest after `start`."""
    if offsets == list(range(len(offsets))):
        cache.crop(start + len(offsets) - cache.get_seq_length())
        return
    for layer in cache.layers:
        index = torch.tensor(offsets, dtype=torch.long, device=layer.keys.device) + start
        layer.keys[..., start : start + len(offsets), :] = layer.keys.index_select(-2, index)
        layer.values[..., start : start + len(offsets), :] = layer.values.index_select(-2, index)
    cache.crop(start + len(offsets) - cache.get_seq_length())


@contextlib.contextmanager
def prepacked_linears(*modules: nn.Module):
    """Run the float32 CPU `nn.Linear` layers of `modules` through oneDNN with weights reordered once.

    PyTorch's default float32 CPU linear (MKL sgemm) took 1.5-2x longer for 2-8 input rows than
    for one row on the machine of docs/benchmarks.md, so verifying a block of drafted tokens cost
    much more than one decoding step. With weights prepacked for oneDNN, a 5-token block costs
    about as much as one token there. Use it for inference only: the packed copies do not follow
    weight updates, and they take as much memory as the weights. Layers of other types, dtypes or
    devices, and machines without oneDNN, keep their forward. The forwards are restored on exit.
    """
    mkldnn_ops = getattr(torch.ops, "mkldnn", None)
    usable = torch.backends.mkldnn.is_available() and hasattr(mkldnn_ops, "_linear_pointwise")
    patched = []
    try:
        if usable:
            with torch.no_grad():
                for module in modules:
                    for layer in module.modules():
                        if type(layer) is nn.Linear and layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float32:
                            # NOTE: _reorder_linear_weight and _linear_pointwise are the private oneDNN ops
                            # that torch.compile's CPU backend uses (present in torch 2.13).
                            layer._caft_packed_weight = mkldnn_ops._reorder_linear_weight(layer.weight.detach(), 8)
                            layer.forward = types.MethodType(_packed_linear_forward, layer)
                            patched.append(layer)
        yield len(patched)
    finally:
        for layer in patched:
            del layer.forward
            del layer._caft_packed_weight


def _packed_linear_forward(self: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(hidden, self._caft_packed_weight, self.bias, "none", [], "")


def _eos_ids(model: nn.Module, eos_token_id) -> set[int]:
    if eos_token_id is None:
        generation_config = getattr(model, "generation_config", None)
        eos_token_id = getattr(generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}


class _TokenChooser:
    """Greedy or temperature sampling from logits, with the speculative acceptance rule."""

    def __init__(self, temperature: float, generator: torch.Generator | None):
        self.temperature = temperature
        self.generator = generator

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def choose(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(torch.argmax(logits))
        return self.sample(self.probs(logits))

    def sample(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accept(self, draft: int, model_logits: torch.Tensor, draft_logits: torch.Tensor) -> tuple[bool, int | None]:
        """Decide on one draft token; return (accepted, replacement token after a rejection)."""
        if self.greedy:
            choice = int(torch.argmax(model_logits))
            return choice == draft, None if choice == draft else choice
        p, q = self.probs(model_logits), self.probs(draft_logits)
        uniform = float(torch.rand((), generator=self.generator))
        if uniform * q[draft] < p[draft]:
            return True, None
        residual = torch.clamp(p - q, min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding; a rejection then has zero probability
            residual = p
        return False, self.sample(residual / residual.sum())


@torch.inference_mode()
def speculative_generate(
    model: nn.Module,
    heads: AuxiliaryHeads,
    input_ids: torch.Tensor | list[int],
    max_new_tokens: int = 256,
    num_draft: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    head_cache: bool = True,
    on_tokens: Callable[[list[int]], None] | None = None,
    tree: DraftTree | None = None,
    lookup_tokens: int = 0,
    draft_vocab: int | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after `input_ids` (one prompt), drafting with heads 1..num_draft.

    temperature 0 is greedy decoding; above 0, samples from softmax(logits / temperature) with a
    torch.Generator seeded by `seed`. `eos_token_id` defaults to the model's generation config.
    `on_tokens` receives each group of tokens as soon as it is accepted. `num_draft=0` decodes
    one token per forward pass through the same code path. The model and heads run in eval mode
    and get their previous mode back afterwards.

    With a `tree` (see caft/draft_tree.py), each step verifies several candidates per head at once
    and `num_draft`, when given, must be at least the tree's depth. Trees are for greedy decoding only.
    `lookup_tokens > 0` adds a branch of up to that many tokens from prompt lookup (caft/lookup.py)
    to the tree, or to a chain of the heads' best tokens without a tree; greedy decoding only.
    `draft_vocab` N lets the heads draft token ids below N only (see HeadDrafter); None or 0 is the whole vocabulary.
    """
    model = unwrap_causal_lm(model)
    check_temperature(temperature, "temperature")
    if draft_vocab is not None and draft_vocab < 0:
        raise ValueError(f"draft_vocab must be >= 0 (0 is the whole vocabulary), got {draft_vocab}.")
    if lookup_tokens < 0:
        raise ValueError(f"lookup_tokens must be >= 0 (0 turns prompt lookup off), got {lookup_tokens}.")
    if lookup_tokens and temperature != 0:
        raise ValueError(
            "Prompt lookup keeps the output exact for greedy decoding only; with temperature > 0 set lookup_tokens=0 "
            "(--lookup-tokens 0)."
        )
    if tree is not None:
        if temperature != 0:
            raise ValueError(
                "Tree drafting keeps the output exact for greedy decoding only; with temperature > 0 use chain "
                "drafting (tree=None, --tree-size 0)."
            )
        if tree.depth > len(heads):
            raise ValueError(f"The draft tree is {tree.depth} deep but there are only {len(heads)} heads.")
        if num_draft is not None and num_draft < tree.depth:
            raise ValueError(f"The draft tree is {tree.depth} deep, deeper than num_draft ({num_draft}).")
        num_draft = tree.depth
    num_draft = len(heads) if num_draft is None else num_draft
    if not 0 <= num_draft <= len(heads):
        raise ValueError(f"num_draft must be between 0 and the number of heads ({len(heads)}), got {num_draft}.")
    if lookup_tokens and tree is None:
        tree = DraftTree.chain(num_draft)  # the lookup branch needs tree verification
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    device = next(model.parameters()).device
    input_ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(
            f"speculative_generate takes one non-empty prompt, shape (1, length); got shape {tuple(input_ids.shape)}. "
            "Call it once per prompt."
        )

    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    decoding = _SpeculativeDecoding(
        model, heads, num_draft, _TokenChooser(temperature, generator), _eos_ids(model, eos_token_id), max_new_tokens,
        head_cache, on_tokens, tree, lookup_tokens, draft_vocab,
    )
    if max_new_tokens == 0:
        return GenerationResult(tokens=[], stats=decoding.stats)
    modes = (model.training, heads.training)
    model.eval()
    heads.eval()
    try:
        with _LastLayerCapture(model) as capture, grouped_attention_in_kernel(model, heads):
            decoding.run(input_ids, capture)
    finally:
        model.train(modes[0])
        heads.train(modes[1])
    return GenerationResult(tokens=decoding.tokens, stats=decoding.stats)


class _SpeculativeDecoding:
    """The state of one generation: the model's KV cache, the heads' drafter, the tokens and the counters."""

    def __init__(self, model, heads, num_draft, chooser, eos_ids, max_new_tokens, head_cache, on_tokens, tree=None,
                 lookup_tokens=0, draft_vocab=None):
        self.model = model
        self.draft_vocab = draft_vocab
        self.tree = tree
        self.tree_blocks: dict[int, tuple[DraftTree, _TreeBlock, torch.Tensor]] = {}
        self.lookup_tokens = lookup_tokens
        self.lookup: NgramLookup | None = None
        self.heads = heads
        self.num_draft = num_draft
        self.chooser = chooser
        self.eos_ids = eos_ids
        self.max_new_tokens = max_new_tokens
        self.head_cache = head_cache
        self.on_tokens = on_tokens
        self.tokens: list[int] = []
        self.stats = SpeculativeStats(
            prompts=1, reached=[0] * num_draft, accepted=[0] * num_draft,
            rank_hits=[[0] * RANKS for _ in range(num_draft)], lookup_tokens=lookup_tokens,
        )

    def run(self, input_ids: torch.Tensor, capture: _LastLayerCapture) -> None:
        start = time.perf_counter()
        self.device = input_ids.device
        self.prompt_length = input_ids.shape[1]
        if self.lookup_tokens:
            self.lookup = NgramLookup(input_ids[0].tolist())
        self.drafter = HeadDrafter(self.model, self.heads, self.num_draft, use_cache=self.head_cache, draft_vocab=self.draft_vocab)
        self.cache = reserved_cache(self.model.config)
        if drafting_support(self.model) != "tree" and self.tree is not None:
            raise ValueError(
                f"Tree drafting and prompt lookup need a KV cache of full-attention layers; {type(self.model).__name__} "
                "uses sliding-window or other layers. Use chain drafting without prompt lookup (tree=None, "
                "lookup_tokens=0; --tree-size 0 --lookup-tokens 0)."
            )
        output = self.model(input_ids=input_ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        record_past_after_prefill(self.cache)
        self.stats.forwards += 1
        next_token = self.chooser.choose(output.logits[0, -1])
        self.stats.prefill_s = time.perf_counter() - start
        head_logits = self._draft(capture, -1) if self.num_draft and self.max_new_tokens > 1 else []

        step = self._step if self.tree is None else self._tree_step
        while next_token is not None:
            next_token, head_logits = step(capture, next_token, head_logits)
        self.stats.new_tokens = len(self.tokens)
        self.stats.total_s = time.perf_counter() - start

    def _step(self, capture, next_token: int, head_logits: list[torch.Tensor]) -> tuple[int | None, list[torch.Tensor]]:
        """Commit `next_token`, verify the drafts after it and commit the accepted ones.

        Returns the model's token after them and the heads' logits for the next drafts, or
        (None, []) when generation has ended.
        """
        remaining = self._commit_next(next_token)
        if remaining == 0:
            return None, []
        committed = next_token
        drafts = [self.chooser.choose(logits) for logits in head_logits[:remaining]]

        tick = time.perf_counter()
        block = torch.tensor([[next_token] + drafts], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=block, cache=self.cache, use_cache=True).logits[0]  # (1 + drafts, V)
        self.stats.forwards += 1
        self.stats.steps += 1
        self.stats.block_tokens += block.shape[1]
        num_accepted, next_token = _verify(self.chooser, drafts, logits, head_logits, self.stats)
        crop_cache(self.cache, len(drafts) - num_accepted)
        self.stats.verify_s += time.perf_counter() - tick

        if self._commit_drafts(committed, drafts[:num_accepted]):
            return None, []
        return next_token, self._draft(capture, num_accepted) if self.num_draft else []

    def _commit_next(self, next_token: int) -> int:
        """Append the model's token; return how many more tokens may follow (0 when generation has ended)."""
        self.tokens.append(next_token)
        remaining = self.max_new_tokens - len(self.tokens)
        if next_token in self.eos_ids or remaining <= 0:
            self._emit([next_token])
            return 0
        return remaining

    def _commit_drafts(self, committed: int, accepted: list[int]) -> bool:
        """Append the accepted drafts up to the first end-of-sequence token; emit them after `committed`, the token
        `_commit_next` appended before them; return whether generation has ended."""
        new = [committed]
        for draft in accepted:
            self.tokens.append(draft)
            new.append(draft)
            if draft in self.eos_ids:
                break
        self._emit(new)
        return self.tokens[-1] in self.eos_ids or len(self.tokens) == self.max_new_tokens

    def _tree_step(self, capture, next_token: int, head_logits: list[torch.Tensor]) -> tuple[int | None, list[torch.Tensor]]:
        """Run `_step` with a tree of candidates: walk down the tree while a child contains the model's token."""
        remaining = self._commit_next(next_token)
        if remaining == 0:
            return None, []
        tree, block, token_index = self._tree_block(min(remaining, self.tree.depth))

        tick = time.perf_counter()
        candidates = [torch.tensor([next_token], device=self.device)]
        candidates += [logits.topk(width).indices for logits, width in zip(head_logits, tree.widths)]
        tokens = torch.cat(candidates).index_select(0, token_index).tolist()  # the tokens of the tree's nodes
        if self.lookup is not None:
            block, tokens = self._add_lookup(block, tokens, remaining)
        past = self.cache.get_seq_length()
        size = len(tokens)
        mask = torch.zeros(1, 1, size, past + size, dtype=block.mask.dtype, device=self.device)
        mask[0, 0, :, past:] = block.mask
        logits = self.model(
            input_ids=torch.tensor([tokens], device=self.device), position_ids=(block.depths + past)[None],
            attention_mask=mask, cache=self.cache, use_cache=True,
        ).logits[0]  # (size, V)
        self.stats.forwards += 1
        self.stats.steps += 1
        self.stats.block_tokens += size
        choices = logits.argmax(dim=-1).tolist()
        path = self._accepted_path(block, tokens, choices, head_logits)
        keep_cache_positions(self.cache, past, path)
        self.stats.verify_s += time.perf_counter() - tick

        if self._commit_drafts(tokens[0], [tokens[node] for node in path[1:]]):
            return None, []
        next_token = choices[path[-1]]
        if not self.num_draft:
            return next_token, []
        tick = time.perf_counter()
        head_logits = self.drafter.draft_logits_path(capture, path, past)
        self.stats.heads_s += time.perf_counter() - tick
        return next_token, head_logits

    def _accepted_path(self, block: _TreeBlock, tokens: list[int], choices: list[int], head_logits) -> list[int]:
        """Walk from the root down the children that hold the model's token; return the nodes walked through.

        Head k's counters move only where a node of the heads' tree was checked or accepted at depth
        k. An accepted node that only prompt lookup added counts as a lookup acceptance.
        """
        path = [0]
        while children := block.children[path[-1]]:
            depth = len(path) - 1
            choice = choices[path[-1]]
            head_checked = depth < len(head_logits) and any(child < block.first_lookup for child in children)
            if head_checked:
                self.stats.reached[depth] += 1
                self.stats.count_rank(depth, head_logits[depth], choice)
            match = next((child for child in children if tokens[child] == choice), None)
            if match is None:
                break
            if match >= block.first_lookup:
                self.stats.lookup_accepted += 1
            elif head_checked:
                self.stats.accepted[depth] += 1
            self.stats.accepted_drafts += 1
            path.append(match)
        return path

    def _add_lookup(self, block: _TreeBlock, tokens: list[int], remaining: int) -> tuple[_TreeBlock, list[int]]:
        """Return the block and node tokens with prompt lookup's proposal attached below the root."""
        self.lookup.extend(self.tokens[len(self.lookup.tokens) - self.prompt_length :])
        proposal = self.lookup.propose(min(self.lookup_tokens, remaining))
        if not proposal:
            return block, tokens
        parents, children, tokens, first_new = attach_chain(block.parents, block.children, tokens, proposal)
        if first_new == len(parents):
            return block, tokens
        self.stats.lookup_steps += 1
        self.stats.lookup_drafted += len(parents) - first_new
        return _TreeBlock(parents, children, block.mask.dtype, self.device, first_new), tokens

    def _tree_block(self, depth: int) -> tuple[DraftTree, _TreeBlock, torch.Tensor]:
        """Return the heads' tree cut to `depth`, its block and its node token indices (cached per depth)."""
        if depth not in self.tree_blocks:
            tree = self.tree if depth >= self.tree.depth else self.tree.truncated(depth)
            dtype = next(self.model.parameters()).dtype
            block = _TreeBlock(tree.parents, tree.children, dtype, self.device)
            self.tree_blocks[depth] = (tree, block, tree.token_index().to(self.device))
        return self.tree_blocks[depth]

    def _draft(self, capture: _LastLayerCapture, row: int) -> list[torch.Tensor]:
        tick = time.perf_counter()
        logits = self.drafter.draft_logits(capture, row)
        self.stats.heads_s += time.perf_counter() - tick
        return logits

    def _emit(self, new: list[int]) -> None:
        if self.on_tokens is not None:
            self.on_tokens(new)


class _TreeBlock:
    """The tree of one verification block on the model's device: parents, children, depths and attention mask.

    Nodes from `first_lookup` on were added by prompt lookup; the others belong to the heads' tree.
    """

    def __init__(self, parents: list[int], children: list[list[int]], dtype: torch.dtype, device, first_lookup=None):
        self.parents = parents
        self.children = children
        self.first_lookup = len(parents) if first_lookup is None else first_lookup
        depths = [0]
        for parent in parents[1:]:
            depths.append(depths[parent] + 1)
        self.depths = torch.tensor(depths, dtype=torch.long, device=device)
        self.mask = torch.full((len(parents),) * 2, torch.finfo(dtype).min, dtype=dtype, device=device)
        self.mask.masked_fill_(ancestor_mask(parents).to(device), 0.0)


def _verify(chooser: _TokenChooser, drafts: list[int], logits: torch.Tensor, head_logits, stats) -> tuple[int, int]:
    """Accept the longest agreeing prefix of drafts; return (accepted count, the model's next token)."""
    for index, draft in enumerate(drafts):
        stats.reached[index] += 1
        if chooser.greedy:
            stats.count_rank(index, head_logits[index], int(torch.argmax(logits[index])))
        accepted, replacement = chooser.accept(draft, logits[index], head_logits[index])
        if not accepted:
            return index, replacement
        stats.accepted[index] += 1
        stats.accepted_drafts += 1
    return len(drafts), chooser.choose(logits[len(drafts)])


# Loading and the command line ---------------------------------------------------------------------


def load_model_for_generation(name_or_path: str, dtype: str = "float32") -> tuple[nn.Module, object, Path | None]:
    """Load a model for inference: a base model name, a merged model folder, or a caft LoRA run folder.

    A LoRA run folder (with adapter_config.json) is merged into its base model in memory.
    Returns (model, tokenizer, the model's folder or None for a hub id).
    """
    from .assets import resolve_model_name
    from .loading import load_adapter_model, load_model, load_tokenizer

    folder = Path(name_or_path)
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        hint = "Correct base_model_name_or_path in that file, or export the run with `caft export RUN --base-model BASE`."
        adapter_model, base_name = load_adapter_model(folder, dtype=dtype, base_hint=hint)
        model = adapter_model.merge_and_unload()
        tokenizer_source = str(folder) if (folder / "tokenizer_config.json").is_file() else base_name
    else:
        model = load_model(name_or_path, dtype)
        tokenizer_source = name_or_path
    model.eval()
    local = Path(resolve_model_name(name_or_path))
    return model, load_tokenizer(tokenizer_source), local if local.is_dir() else None


def load_heads_for(model: nn.Module, source: str | Path) -> AuxiliaryHeads:
    """Build heads of the saved shape on `model` and load their weights strictly from a heads folder or file."""
    from .heads import HeadsConfig, infer_config_from_state

    saved_config, state, where = read_heads_file(source)
    config = saved_config or infer_config_from_state(state)
    fresh = HeadsConfig(
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        arch=config.arch,
        wiring=config.wiring,
        separate_unembed=config.separate_unembed,
        base_model=config.base_model,
        extra=dict(config.extra),
    )
    heads = build_heads(model, fresh)
    load_heads_state(heads, state, where)
    return heads


def encode_prompt(tokenizer, text: str, chat_template: bool = True) -> list[int]:
    """Tokenize a prompt as training does: one user turn rendered with the generation prompt, or plain text.

    With the chat template, the tokens equal those that `caft.chat.tokenize_conversation` puts
    before the assistant reply of the same user message, so generation sees the training layout.
    """
    from .chat import _tokenizer_adds_bos

    if not chat_template:
        return tokenizer(text)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer of {getattr(tokenizer, 'name_or_path', '') or 'this model'} has no chat template. "
            "Pass --no-chat-template to use the prompt text as it is."
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if _tokenizer_adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids.insert(0, tokenizer.bos_token_id)
    return ids


def check_temperature(temperature: float, name: str) -> None:
    """Raise ValueError unless `temperature` is a finite number >= 0; `name` is the argument or flag in the message."""
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"{name} must be a finite number >= 0 (0 is greedy decoding), got {temperature}.")


def write_tree_stats(stats: SpeculativeStats, path: str | Path, source: str) -> None:
    """Write `stats.rank_accuracy()` as an eval_heads.json-like file that `--tree-stats` reads."""
    results = [
        {"head": head, "rank_accuracy": rates, "steps": reached}
        for head, (rates, reached) in enumerate(zip(stats.rank_accuracy(), stats.reached), start=1)
    ]
    if not results or not results[0]["steps"]:
        raise ValueError("No draft was checked, so there are no rank rates to save; generate more tokens with heads.")
    Path(path).write_text(json.dumps({"source": source, "heads_results": results}, indent=2) + "\n", encoding="utf-8")
