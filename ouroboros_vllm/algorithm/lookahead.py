"""The draft model's lookahead (Jacobi) window: a source of phrases for the pool, carried across rounds.

Lookahead decoding (Fu et al., 2024) keeps, per request, a window of ``num_levels`` x ``width`` guessed tokens
that the draft model refines in every forward it makes anyway. Level 0 is a guessed continuation of the
request, one token per column at the positions right after the last fed token; level ``l`` of column ``i``
continues the trajectory "level 0 up to column i-1, then levels 1..l of column i":

    positions      p0      p0+1     p0+2    ...
    level 0        g0[0]   g0[1]    g0[2]
    level 1        g1[0]   g1[1]    g1[2]        g1[i] follows g0[i-1]   (at p0 + i)
    level 2                g2[0]    g2[1]  ...   g2[i] follows g1[i]     (at p0 + i + 1)

The draft model's argmax on top of each column's trajectory ends an N-gram ``g0[i-1], g1[i], ..., out[i]``
(for column 0 the key is the last fed token): ``width`` new phrases for the pool per forward. Then the levels
move up one step, as in a Jacobi iteration: level 0 takes level 1, each level takes the one above it one
column to the left (so every token keeps its position), and the top level takes the fresh outputs.

The window only proposes phrases; the draft model still checks every phrase against its own greedy tokens
(:class:`ouroboros_vllm.algorithm.drafting.DraftRound`), so a poor window costs time, never exactness.
As in Lookahead decoding, the window is not realigned when a forward emits several tokens: its guesses then
refer to a position a few tokens back, which only makes them less likely to match.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

Ngram = tuple[int, tuple[int, ...]]  # (key token, the N-1 tokens that followed it)


@dataclass
class LookaheadWindow:
    """``levels[l][i]``: the guessed token of level ``l`` (0 .. N-2), column ``i`` (0 .. W-1)."""

    levels: list[list[int]]

    @classmethod
    def from_history(cls, history: Sequence[int], num_levels: int, width: int) -> LookaheadWindow:
        """A window filled with tokens drawn from the request's own history (deterministic per history)."""
        if num_levels < 2 or width < 1:
            raise ValueError(f"a lookahead window needs at least 2 levels and 1 column, got {num_levels}x{width}")
        rng = random.Random(len(history))
        return cls([[int(rng.choice(history)) for _ in range(width)] for _ in range(num_levels)])

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def width(self) -> int:
        return len(self.levels[0])

    def tokens(self) -> list[int]:
        """The window's tokens in forward order: level 0's columns, then level 1's, ..."""
        return [token for level in self.levels for token in level]

    def output_slots(self) -> list[int]:
        """Offsets (within :meth:`tokens`) whose argmax :meth:`advance` needs: column 0 of the middle levels,
        then every column of the top level."""
        top = self.num_levels - 1
        return [level * self.width for level in range(1, top)] + [top * self.width + i for i in range(self.width)]

    def ngrams(self, last_token: int, outputs: Sequence[int]) -> list[Ngram]:
        """The ``width`` N-grams this forward completed; ``outputs`` is the argmax at :meth:`output_slots`."""
        top_outputs = outputs[self.num_levels - 2 :]
        found = []
        for i in range(self.width):
            key = last_token if i == 0 else self.levels[0][i - 1]
            found.append((key, (*(self.levels[level][i] for level in range(1, self.num_levels)), top_outputs[i])))
        return found

    def advance(self, next_token: int, outputs: Sequence[int]) -> None:
        """One Jacobi step: move every level up (see the module docstring); ``next_token`` is the draft's
        greedy token after the last fed one, ``outputs`` the argmax at :meth:`output_slots`."""
        top = self.num_levels - 1
        column0 = [next_token, *outputs[: top - 1]]  # what fills column 0 of levels 1 .. top
        top_outputs = outputs[top - 1 :]
        old = self.levels
        new = [list(old[1])]
        for level in range(1, top + 1):
            source = old[level + 1] if level < top else top_outputs
            new.append([column0[level - 1], *source[:-1]])
        self.levels = new
