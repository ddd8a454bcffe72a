"""Feeding the target's verification back into the phrase pool: inspiration and refinement (pure functions).

Notation, for one request and one verified proposal: the trunk is the draft model's tokens ``draft[0..m-1]``;
``target_argmax[j]`` is the target's argmax given the context plus ``draft[:j]``, for ``j = 0..m`` (the
runner hook delivers it at every verified position, after a rejection too). ``target_argmax[m]`` is the
target's prediction at the trunk's end.
"""

from __future__ import annotations

from collections.abc import Sequence

from ouroboros_vllm.algorithm.pool import Phrase


def first_mismatch(draft: Sequence[int], target_argmax: Sequence[int]) -> int:
    """Index of the first draft token the target rejects under greedy verification (``len(draft)`` if none)."""
    for index, token in enumerate(draft):
        if token != target_argmax[index]:
            return index
    return len(draft)


def inspiration(draft: Sequence[int], target_argmax: Sequence[int], phrase_len: int) -> list[tuple[int, Phrase]]:
    """(key, phrase) pairs harvested from the rejected tail of the trunk.

    For each position k from the first rejected one on: key = ``draft[k]``; the phrase is what the target
    predicted after it, ``target_argmax[k+1], target_argmax[k+2], ...``, extended only while the draft token
    the target saw next equals the target's previous prediction (so the phrase is a continuation the target
    itself produced from ``draft[k]`` on). Only full phrases of ``phrase_len`` tokens are kept: "mostly right
    but misplaced" stretches that later rounds can reuse.
    """
    if len(target_argmax) != len(draft) + 1:
        raise ValueError(f"need len(draft) + 1 = {len(draft) + 1} target predictions, got {len(target_argmax)}")
    start = first_mismatch(draft, target_argmax)
    harvested: list[tuple[int, Phrase]] = []
    for k in range(start, len(draft)):
        phrase: list[int] = []
        for j in range(k + 1, len(draft) + 1):
            phrase.append(target_argmax[j])
            if len(phrase) == phrase_len or (j < len(draft) and draft[j] != target_argmax[j]):
                break
        if len(phrase) == phrase_len:
            harvested.append((draft[k], tuple(phrase)))
    return harvested


def refinement(suffix_argmax: Sequence[int], phrase_len: int) -> Phrase | None:
    """The target's own continuation on a candidate suffix's branch, to replace that suffix in the pool.

    ``suffix_argmax[0]`` is the target's argmax at the trunk's end (the token after the key), and
    ``suffix_argmax[1 + j]`` its argmax after suffix token j. The refined phrase is the first ``phrase_len``
    of them; None when fewer were verified (vLLM cut the proposal short).
    """
    refined = tuple(suffix_argmax[:phrase_len])
    return refined if len(refined) == phrase_len else None
