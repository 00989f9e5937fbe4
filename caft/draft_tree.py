"""Draft trees: several candidate continuations from the heads, verified by the model in one forward pass.

A chain drafts one token per head: head 1's best token, then head 2's best, and so on. When head 1
is wrong, the whole chain is lost, although the right token is often head 1's second or third
choice. A tree drafts several candidates per head and verifies all of them in one forward pass.
Its attention mask lets each candidate see only the prompt, the tokens before it and its own
ancestors, as in Medusa (Cai et al. 2024).

A node is written as the tuple of candidate ranks along its path from the root: `(0,)` is head 1's
best token, `(1,)` its second best, `(0, 2)` head 2's third best token after head 1's best. The
root is the model's own next token. Every head drafts from the same state, so a node's token
depends only on its depth and rank. The tree decides which combinations are worth checking.

`DraftTree.from_rank_accuracy` picks the `size` nodes with the highest chance of acceptance,
estimating the chance of a node as the product over its path of "head d's rank-r candidate is the
right token". Those rates come from `caft eval-heads` (`rank_accuracy` in eval_heads.json).
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_TREE_SIZE = 4
"""Nodes below the root in the default tree.

With prompt lookup's branch beside it, trees of 2, 4 and 6 ran at about the same speed on CPU in
docs/benchmarks.md and 8 was slower. There a block of tokens costs much more than one token;
where it costs about the same (GPUs), larger trees accept more tokens per forward.
"""

FALLBACK_RANK_ACCURACY = [
    [0.42, 0.12, 0.06, 0.04, 0.03, 0.03],
    [0.27, 0.10, 0.06, 0.04, 0.03, 0.03],
    [0.20, 0.09, 0.06, 0.04, 0.03, 0.03],
    [0.17, 0.08, 0.05, 0.04, 0.03, 0.03],
]
"""Rate at which head d's rank-r candidate is the right token, used when no eval-heads results are found.

Rounded from `caft eval-heads` on the held-out distilled replies, for the distilled
SmolLM2-135M-Instruct heads of docs/benchmarks.md. Deeper heads repeat the last row.
"""


@dataclass(frozen=True)
class DraftTree:
    """A prefix-closed set of nodes, each the tuple of candidate ranks from the root (see the module docstring).

    Index 0 of every per-node list is the root; nodes 1..N follow in breadth-first order, so a
    parent always comes before its children.
    """

    nodes: tuple[tuple[int, ...], ...]
    parents: list[int] = field(init=False, repr=False)
    depths: list[int] = field(init=False, repr=False)
    children: list[list[int]] = field(init=False, repr=False)
    widths: list[int] = field(init=False, repr=False)
    """Per depth d (index d-1): the number of candidates needed from head d, i.e. the largest rank + 1."""

    def __post_init__(self):
        nodes = tuple(sorted({tuple(node) for node in self.nodes}, key=lambda node: (len(node), node)))
        if len(nodes) != len(self.nodes):
            raise ValueError("A draft tree lists a node twice.")
        index = {(): 0}
        parents, depths, children = [-1], [0], [[]]
        for node in nodes:
            if not node or any(not isinstance(rank, int) or rank < 0 for rank in node):
                raise ValueError(f"Draft tree node {node!r} must be a non-empty tuple of ranks >= 0.")
            if node[:-1] not in index:
                raise ValueError(f"Draft tree node {node!r} has no parent {node[:-1]!r} in the tree.")
            parent = index[node[:-1]]
            index[node] = len(parents)
            children[parent].append(len(parents))
            parents.append(parent)
            depths.append(len(node))
            children.append([])
        widths = [0] * max((len(node) for node in nodes), default=0)
        for node in nodes:
            widths[len(node) - 1] = max(widths[len(node) - 1], node[-1] + 1)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "depths", depths)
        object.__setattr__(self, "children", children)
        object.__setattr__(self, "widths", widths)

    def __len__(self) -> int:
        """Nodes below the root."""
        return len(self.nodes)

    @property
    def depth(self) -> int:
        return len(self.widths)

    @classmethod
    def chain(cls, length: int) -> DraftTree:
        """Return the tree of plain chain drafting: each head's best token after the previous one."""
        return cls(tuple((0,) * depth for depth in range(1, length + 1)))

    @classmethod
    def from_rank_accuracy(cls, rank_accuracy: list[list[float]], size: int, max_depth: int) -> DraftTree:
        """Build the tree of the `size` nodes of depth <= `max_depth` with the highest product of rank accuracies.

        `rank_accuracy[d][r]` is the rate at which head d+1's rank-r candidate is the right token;
        heads beyond the list repeat its last row. Products shrink along a path, so the chosen
        set is prefix-closed: a best-first search from the root finds it.
        """
        if size < 0 or max_depth < 0:
            raise ValueError(f"Tree size and depth must be >= 0, got size {size} and depth {max_depth}.")
        if not rank_accuracy or any(not row for row in rank_accuracy):
            raise ValueError("rank_accuracy needs at least one rate for at least one head.")
        if any(not 0.0 <= rate <= 1.0 or math.isnan(rate) for row in rank_accuracy for rate in row):
            raise ValueError("Every rank accuracy must be a rate between 0 and 1.")
        rates = lambda depth: rank_accuracy[min(depth, len(rank_accuracy)) - 1]  # noqa: E731
        frontier: list[tuple[float, tuple[int, ...]]] = []
        if max_depth >= 1:
            frontier = [(-rate, (rank,)) for rank, rate in enumerate(rates(1)) if rate > 0]
        heapq.heapify(frontier)
        chosen = []
        while frontier and len(chosen) < size:
            negative_chance, node = heapq.heappop(frontier)
            chosen.append(node)
            if len(node) < max_depth:
                for rank, rate in enumerate(rates(len(node) + 1)):
                    if rate > 0:
                        heapq.heappush(frontier, (negative_chance * rate, node + (rank,)))
        return cls(tuple(chosen))

    def truncated(self, max_depth: int) -> DraftTree:
        """Return this tree without the nodes deeper than `max_depth`."""
        return DraftTree(tuple(node for node in self.nodes if len(node) <= max_depth))

    def token_index(self) -> torch.Tensor:
        """Return per node its index into `[root token] + head 1's candidates + head 2's candidates + ...`."""
        offsets = [1]
        for width in self.widths:
            offsets.append(offsets[-1] + width)
        return torch.tensor([0] + [offsets[len(node) - 1] + node[-1] for node in self.nodes], dtype=torch.long)

    def ancestor_mask(self) -> torch.Tensor:
        """Return an (N+1, N+1) bool tensor whose entry [i, j] is True when node j is node i or one of its ancestors."""
        return ancestor_mask(self.parents)

    def describe(self) -> str:
        per_depth = [sum(1 for node in self.nodes if len(node) == depth) for depth in range(1, self.depth + 1)]
        return f"{len(self)} nodes, depth {self.depth}, nodes per depth {per_depth}, candidates per head {self.widths}"


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """Return the (M, M) bool tensor whose entry [i, j] is True when node j is node i or an ancestor of it.

    `parents[i]` is node i's parent (-1 for the root at index 0); every parent comes before its children.
    """
    size = len(parents)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for node in range(size):
        mask[node, node] = True
        if node:
            mask[node] |= mask[parents[node]]
    return mask


def attach_chain(parents: list[int], children: list[list[int]], tokens: list[int], chain: list[int]):
    """Add the token sequence `chain` below the root of a tree of tokens; return (parents, children, tokens, first new node).

    The chain follows existing nodes while one contains its next token, so a candidate that the tree
    already verifies is not added twice. The rest of the chain becomes new nodes appended after
    the existing ones, each the child of the one before. The inputs are left unchanged; when
    nothing is new, the first new node equals the number of nodes.
    """
    parents, children, tokens = list(parents), [list(kids) for kids in children], list(tokens)
    first_new = len(parents)
    node = 0
    for position, token in enumerate(chain):
        match = next((child for child in children[node] if tokens[child] == token), None)
        if match is None:
            for token in chain[position:]:
                parents.append(node)
                children.append([])
                tokens.append(token)
                children[node].append(len(parents) - 1)
                node = len(parents) - 1
            break
        node = match
    return parents, children, tokens, first_new


def read_rank_accuracy(path: str | Path) -> list[list[float]]:
    """Read the per-head rank accuracies from a `caft eval-heads` results file (eval_heads.json)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read eval-heads results {path}: {error}") from error
    results = report.get("heads_results") if isinstance(report, dict) else None
    if not isinstance(results, list):
        raise ValueError(f"{path}: no 'heads_results' list; pass the eval_heads.json that `caft eval-heads` writes.")
    rows = [
        result.get("rank_accuracy")
        for result in results
        if isinstance(result, dict) and isinstance(result.get("head"), int) and result["head"] > 0
    ]
    if not rows or any(not isinstance(row, list) or not row for row in rows):
        raise ValueError(
            f"{path}: the heads results have no 'rank_accuracy' lists; the file was written by an older caft. "
            "Rerun `caft eval-heads` on held-out data to get them."
        )
    return [[float(rate) for rate in row] for row in rows]
