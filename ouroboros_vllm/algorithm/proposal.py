"""A proposal: the draft model's trunk lengthened by candidate suffixes from the phrase pool.

vLLM verifies one chain of tokens per request, so the proposal is ``trunk + suffix + suffix ...`` cut to the
step's budget; each suffix is the pool's best-evidenced continuation of the chain so far (the phrase matching
the most of its last tokens). We remember which stretch came from which pool phrase (its key and its offset in
the chain) so that, once the target has verified the chain, each used phrase can be refined by identity and
the trunk's rejected tail can inspire new phrases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ouroboros_vllm.algorithm import feedback
from ouroboros_vllm.algorithm.pool import Phrase, PhrasePool


@dataclass(frozen=True)
class SuffixUse:
    """A pool phrase placed in the chain: ``phrase`` was stored under ``key``; its first ``matched`` tokens
    matched the chain's end, the rest starts at ``offset``."""

    key: int
    phrase: Phrase
    offset: int
    matched: int = 0


@dataclass
class Proposal:
    tokens: list[int] = field(default_factory=list)
    trunk_len: int = 0  # tokens[:trunk_len] came from the draft model
    suffixes: list[SuffixUse] = field(default_factory=list)


def lengthen(pool: PhrasePool, proposal: Proposal, context: Sequence[int], budget: int) -> None:
    """Append pool phrases until ``budget`` tokens or a miss, each the one that continues the chain on the most
    evidence (:meth:`PhrasePool.match`): the chain is ``context`` (the request's last verified tokens, at least
    one) followed by the proposal so far."""
    tail = pool.phrase_len
    while len(proposal.tokens) < budget:
        chain = [int(token) for token in [*context[-tail:], *proposal.tokens][-tail:]]
        found = pool.match(chain)
        if found is None:
            return
        key, phrase, matched = found
        offset = len(proposal.tokens)
        proposal.tokens.extend(phrase[matched:][: budget - offset])
        proposal.suffixes.append(SuffixUse(key, phrase, offset, matched))


def suffix_acceptance(proposal: Proposal, accepted: int) -> tuple[int, int]:
    """(proposed, accepted) tokens of the suffixes that matched the chain on at least one token besides the key,
    when the target accepted the proposal's first ``accepted`` tokens."""
    proposed = taken = 0
    ends = [use.offset for use in proposal.suffixes[1:]] + [len(proposal.tokens)] * bool(proposal.suffixes)
    for use, end in zip(proposal.suffixes, ends, strict=True):
        if use.matched:
            proposed += end - use.offset
            taken += min(max(accepted - use.offset, 0), end - use.offset)
    return proposed, taken


def apply_feedback(pool: PhrasePool, proposal: Proposal, verified: Sequence[int], target_argmax: Sequence[int]) -> None:
    """Inspiration from the trunk's rejected tail and refinement of every fully verified suffix.

    ``verified`` is the part of the proposal the target saw (vLLM may schedule fewer tokens than proposed);
    ``target_argmax[j]`` is the target's argmax after ``verified[:j]`` (``len(verified) + 1`` entries).
    """
    phrase_len = pool.phrase_len
    trunk_len = min(proposal.trunk_len, len(verified))
    pool.insert_many(feedback.inspiration(verified[:trunk_len], target_argmax[: trunk_len + 1], phrase_len))
    for use in proposal.suffixes:
        # The phrase's matched tokens are the chain's (verified, or the trunk's): the target's argmax refines the rest.
        rest = phrase_len - use.matched
        refined = feedback.refinement(target_argmax[use.offset : use.offset + rest], rest)
        if refined is not None:
            pool.refine(use.key, use.phrase, use.phrase[: use.matched] + refined)


def context_ngrams(tokens: Sequence[int], start: int, phrase_len: int) -> list[tuple[int, Phrase]]:
    """(key, phrase) for every full N-gram of ``tokens`` whose last token is at index >= ``start``.

    Not in the reference: the request's own text (prompt and verified output) is the cheapest source of
    phrases the target will repeat, and it seeds the pool before any draft exists.
    """
    first_key = max(0, start - phrase_len)
    return [
        (int(tokens[k]), tuple(int(t) for t in tokens[k + 1 : k + 1 + phrase_len]))
        for k in range(first_key, len(tokens) - phrase_len)
    ]
