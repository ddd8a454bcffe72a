"""A proposal: the draft model's trunk lengthened by candidate suffixes from the phrase pool.

As a chain, the proposal is ``trunk + suffix + suffix ...`` cut to the step's budget; each suffix is the pool's
best-evidenced continuation of the chain so far (the phrase matching the most of its last tokens). As a tree
(:func:`lengthen_tree`, for tree verification), the runners-up of the first suffix hang as alternative
branches at the trunk's end, sharing the same node budget. We remember which stretch came from which pool
phrase (its key and its first node) so that, once the target has verified the proposal, each used phrase can
be refined by identity and the trunk's rejected tail can inspire new phrases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ouroboros_vllm.algorithm import feedback
from ouroboros_vllm.algorithm.pool import Phrase, PhrasePool
from ouroboros_vllm.algorithm.tree import DraftTree, predictions_along


@dataclass(frozen=True)
class SuffixUse:
    """A pool phrase placed in the proposal: ``phrase`` was stored under ``key``; its first ``matched`` tokens
    matched the chain's end, the rest are the nodes from ``offset`` on (a chain of nodes, up to the next
    suffix's offset). ``rank`` 0: on the first path; k: the k-th alternative branch."""

    key: int
    phrase: Phrase
    offset: int
    matched: int = 0
    rank: int = 0


@dataclass
class Proposal:
    tokens: list[int] = field(default_factory=list)
    trunk_len: int = 0  # tokens[:trunk_len] came from the draft model
    suffixes: list[SuffixUse] = field(default_factory=list)
    parents: list[int] | None = None  # a tree's parent per node (depth-first); None: a chain
    verified_as_tree: bool = False  # the target verified the tree as one (not as the chain of its tokens)

    def tree(self) -> DraftTree:
        return DraftTree(list(self.tokens), list(self.parents)) if self.parents else DraftTree.chain(self.tokens)

    def suffix_ends(self) -> list[int]:
        """Where each suffix's nodes end."""
        return [use.offset for use in self.suffixes[1:]] + [len(self.tokens)] * bool(self.suffixes)

    @property
    def alternatives(self) -> int:
        return sum(use.rank > 0 for use in self.suffixes)


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


def lengthen_tree(
    pool: PhrasePool,
    proposal: Proposal,
    context: Sequence[int],
    budget: int,
    candidates: int,
    first_path_rate: float,
    alternative_rate: float,
) -> None:
    """:func:`lengthen`, with up to ``candidates - 1`` runners-up of the first suffix as alternative branches at
    the trunk's end, within the same ``budget`` of nodes. Nodes go where they are likeliest to be accepted: the
    first path's j-th pool token is worth ``first_path_rate ** (j + 1)``, an alternative's j-th token
    ``alternative_rate * first_path_rate ** j`` (siblings exclude each other: at most one is accepted)."""
    tail = pool.phrase_len
    chain = [int(token) for token in [*context[-tail:], *proposal.tokens][-tail:]]
    found = pool.matches(chain, candidates)
    room = budget - len(proposal.tokens)
    if not found or room <= 0:
        return
    continuations = [phrase[matched:] for _, phrase, matched in found]
    shares = _allocate(room, [room] + [len(c) for c in continuations[1:]], first_path_rate, alternative_rate)
    branch_point = len(proposal.tokens) - 1  # the trunk's last node, or the root
    key, phrase, matched = found[0]
    proposal.tokens.extend(continuations[0][: shares[0]])
    proposal.suffixes.append(SuffixUse(key, phrase, branch_point + 1, matched))
    if shares[0] > len(continuations[0]):  # the first path goes on past its phrase, as a chain would
        lengthen(pool, proposal, context, len(proposal.tokens) + shares[0] - len(continuations[0]))
    parents = proposal.parents = list(range(-1, len(proposal.tokens) - 1))
    for rank, ((key, phrase, matched), continuation, share) in enumerate(
        zip(found[1:], continuations[1:], shares[1:], strict=True), start=1
    ):
        if share:
            offset = len(proposal.tokens)
            proposal.tokens.extend(continuation[:share])
            parents.extend([branch_point] + list(range(offset, offset + share - 1)))
            proposal.suffixes.append(SuffixUse(key, phrase, offset, matched, rank))
    if not proposal.alternatives:
        proposal.parents = None


def _allocate(room: int, caps: Sequence[int], first_path_rate: float, alternative_rate: float) -> list[int]:
    """Nodes per candidate (``caps`` each at most), each next node to the candidate whose next token is the
    likeliest to be accepted; the first path wins ties."""
    shares = [0] * len(caps)
    for _ in range(room):
        best, best_value = None, -1.0
        for rank, cap in enumerate(caps):
            if shares[rank] < cap:
                first = first_path_rate if rank == 0 else alternative_rate
                value = first * first_path_rate ** shares[rank]
                if value > best_value:
                    best, best_value = rank, value
        if best is None:
            break
        shares[best] += 1
    return shares


def suffix_acceptance(proposal: Proposal, accepted_nodes: Sequence[int]) -> tuple[int, int]:
    """(proposed, accepted) tokens of the suffixes that matched the chain on at least one token besides the key,
    when the target accepted ``accepted_nodes``."""
    proposed = taken = 0
    accepted = set(accepted_nodes)
    for use, end in zip(proposal.suffixes, proposal.suffix_ends(), strict=True):
        if use.matched:
            proposed += end - use.offset
            taken += len(accepted.intersection(range(use.offset, end)))
    return proposed, taken


def apply_feedback(pool: PhrasePool, proposal: Proposal, verified: Sequence[int], target_argmax: Sequence[int]) -> None:
    """Inspiration from the trunk's rejected tail and refinement of every fully verified suffix.

    ``verified`` is the part of the proposal the target saw (vLLM may schedule fewer tokens than proposed);
    ``target_argmax[j]`` is the target's argmax at row j of its forward (the root's, then one per node:
    ``len(verified) + 1`` entries). Verified as a chain, a tree's alternatives saw the wrong context: only its
    first path is refined then.
    """
    phrase_len = pool.phrase_len
    trunk_len = min(proposal.trunk_len, len(verified))
    pool.insert_many(feedback.inspiration(verified[:trunk_len], target_argmax[: trunk_len + 1], phrase_len))
    tree = (proposal.tree() if proposal.verified_as_tree else DraftTree.chain(proposal.tokens)).truncated(len(verified))
    for use in proposal.suffixes:
        if use.offset >= len(verified) or (use.rank and not proposal.verified_as_tree):
            continue
        # The phrase's matched tokens are the chain's (verified, or the trunk's): the target's argmax refines the rest.
        rest = phrase_len - use.matched
        refined = feedback.refinement(predictions_along(tree, target_argmax, use.offset, rest), rest)
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
