"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of the last few tokens.

Answers repeat parts of their prompt (names, numbers, whole phrases) and of themselves. When the
last n tokens of prompt plus reply occurred before, the tokens that followed them then are a
cheap guess at the next ones (prompt lookup decoding, Saxena 2023). `caft generate` adds this
guess as one more branch of the draft tree, so the model verifies it together with the heads'
candidates in the same forward pass, and greedy outputs stay exact.
"""

from __future__ import annotations

DEFAULT_LOOKUP_TOKENS = 4
"""Tokens proposed per step by prompt lookup in `caft generate`, 0 to turn it off.

With 8, more tokens were accepted per forward but each block cost more; on CPU both ran at about
the same speed in docs/benchmarks.md.
"""

MAX_NGRAM = 3
"""The longest suffix that is looked up; shorter suffixes are tried when it has no earlier occurrence."""


class NgramLookup:
    """An index from every n-gram (n <= `max_ngram`) of a growing token sequence to the position after its latest occurrence.

    `extend` and `propose` cost O(max_ngram ** 2) per token (building the n-gram keys), so lookup
    costs the same at any context length.
    """

    def __init__(self, tokens: list[int], max_ngram: int = MAX_NGRAM):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}.")
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.next_position: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]
        """Per n (index n): n-gram -> the position right after its latest occurrence that has a token after it."""
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append `tokens` to the sequence and index the n-grams that now have a following token."""
        for token in tokens:
            position = len(self.tokens)
            for n in range(1, min(self.max_ngram, position) + 1):
                self.next_position[n][tuple(self.tokens[position - n : position])] = position
            self.tokens.append(int(token))

    def propose(self, count: int) -> list[int]:
        """Return `count` tokens that followed the latest earlier occurrence of the longest matching suffix.

        When that occurrence is so recent that fewer than `count` tokens follow it, the text is taken
        to repeat with the period between the two occurrences (a loop), and the proposal continues
        the repetition. Returns [] when no suffix of 1..max_ngram tokens occurred before.
        """
        if count <= 0:
            return []
        for n in range(min(self.max_ngram, len(self.tokens)), 0, -1):
            start = self.next_position[n].get(tuple(self.tokens[-n:]))
            if start is not None:
                period = len(self.tokens) - start
                return [self.tokens[start + index % period] for index in range(count)]
        return []
