"""The lookahead window's bookkeeping: every token keeps its position through a Jacobi step, and each
completed N-gram is a run of consecutive positions after its key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ouroboros_vllm.algorithm.lookahead import LookaheadWindow


def position(level: int, column: int) -> int:
    """A window token's position, relative to the first position after the last fed token (see masks)."""
    return column if level == 0 else column + level - 1


def labelled_window(levels: int, width: int) -> LookaheadWindow:
    # Each token is labelled with its position; the model's argmax at a slot is labelled with the position
    # it predicts (one more). Then "a token keeps its position" reads "its label equals its new slot's".
    return LookaheadWindow([[position(lv, c) for c in range(width)] for lv in range(levels)])


def predicted_labels(window: LookaheadWindow) -> list[int]:
    width = window.width
    return [position(slot // width, slot % width) + 1 for slot in window.output_slots()]


@given(levels=st.integers(2, 8), width=st.integers(1, 12))
def test_a_jacobi_step_keeps_every_token_at_its_position(levels, width):
    window = labelled_window(levels, width)
    window.advance(next_token=0, outputs=predicted_labels(window))  # next_token predicts position 0
    for lv in range(levels):
        assert window.levels[lv] == [position(lv, c) for c in range(width)]


@given(levels=st.integers(2, 8), width=st.integers(1, 12))
def test_each_ngram_is_its_key_then_the_next_n_minus_1_positions(levels, width):
    window = labelled_window(levels, width)
    ngrams = window.ngrams(last_token=-1, outputs=predicted_labels(window))  # the last fed token is at -1
    assert len(ngrams) == width
    for column, (key, phrase) in enumerate(ngrams):
        assert key == column - 1
        assert phrase == tuple(range(column, column + levels))


def test_window_starts_from_the_request_history_and_rejects_a_degenerate_shape():
    history = [5, 6, 7, 8]
    window = LookaheadWindow.from_history(history, 4, 3)
    assert (window.num_levels, window.width) == (4, 3)
    assert set(window.tokens()) <= set(history)
    assert LookaheadWindow.from_history(history, 4, 3) == window  # deterministic for a given history
    with pytest.raises(ValueError, match="at least 2 levels"):
        LookaheadWindow.from_history(history, 1, 3)
