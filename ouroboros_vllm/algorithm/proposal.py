"""A proposal: the draft model's trunk lengthened by candidate suffixes from the phrase pool.

As a chain, the proposal is ``trunk + suffix + suffix ...`` cut to the step's budget; each suffix is the pool's
best-evidenced continuation of the chain so far (the phrase matching the most of its last tokens). As a tree
(:func:`lengthen_tree`, for tree verification), the runners-up of the first suffix hang as alternative
branches at the trunk's end, sharing the same node budget. We remember which stretch came from which pool
phrase (its key and its first node) so that, once the target has verified the proposal, each used phrase can
be refined by identity and the trunk's rejected tail can inspire new phrases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ouroboros_vllm.algorithm import feedback
from ouroboros_vllm.algorithm.pool import Phrase, PhrasePool
from ouroboros_vllm.algorithm.stats import DraftStats
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
    runner_ups: list[int] = field(default_factory=list)  # nodes holding the draft model's second choice
    # The draft's probability of each trunk token and of each second choice in ``runner_ups`` (None: not known, e.g.
    # a token a phrase drafted): what the target's verdicts calibrate (:class:`~.acceptance.ProbabilityCalibration`).
    trunk_probs: list[float | None] = field(default_factory=list)
    runner_up_probs: list[float | None] = field(default_factory=list)
    verified_as_tree: bool = False  # the target verified the tree as one (not as the chain of its tokens)

    def tree(self) -> DraftTree:
        return DraftTree(list(self.tokens), list(self.parents)) if self.parents else DraftTree.chain(self.tokens)

    def suffix_ends(self) -> list[int]:
        """Where each suffix's nodes end (the draft's second choices come after every suffix)."""
        last = self.runner_ups[0] if self.runner_ups else len(self.tokens)
        return [use.offset for use in self.suffixes[1:]] + [last] * bool(self.suffixes)

    @property
    def key_only_suffix(self) -> bool:
        """Whether the first path's pool suffix (right after the trunk) matched the chain on its key alone."""
        first = self.suffixes[0] if self.suffixes else None
        return first is not None and not first.rank and first.offset == self.trunk_len and not first.matched

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


@dataclass(frozen=True)
class TreeRates:
    """What a tree's nodes are worth: the chance that the next token is accepted, given the ones before it, for
    a trunk token, a pool suffix token (``pool_key_only`` for a phrase that matched the chain on its key alone), an
    alternative branch's first token, and the draft model's runner-up at a trunk position."""

    trunk: float
    pool: float
    branch: float
    runner_up: float
    pool_key_only: float

    def suffix(self, matched: int) -> float:
        """The rate of a suffix token whose phrase matched ``matched`` tokens of the chain besides its key."""
        return self.pool if matched else self.pool_key_only


def lengthen_tree(
    pool: PhrasePool | None,
    proposal: Proposal,
    context: Sequence[int],
    budget: int,
    candidates: int,
    rates: TreeRates,
    runner_ups: Mapping[int, int] | None = None,
    trunk_chances: Sequence[float] | None = None,
    runner_up_chances: Mapping[int, float] | None = None,
) -> None:
    """:func:`lengthen` as a tree, within the same ``budget`` of nodes, each node where it is likeliest to be
    accepted (:func:`_allocate`), among: the trunk's tokens (token i worth ``reach[i + 1]``, the chance that the
    target accepts tokens 0..i, ``trunk_chances[i]`` each given the ones before, ``rates.trunk`` when None), the
    first path's pool suffix after the whole trunk (its j-th token worth ``reach[m] * pool^(j+1)``, at the rate of
    its kind of match: :meth:`TreeRates.suffix`), up to ``candidates - 1`` runners-up of that suffix hung at the
    trunk's end (``reach[m] * branch * pool^j``: siblings exclude each other), and the draft model's second choice
    at trunk position i (``runner_ups[i]``, worth ``reach[i] * runner_up_chances[i]``, ``rates.runner_up`` when
    None), hung beside trunk token i. The trunk's deepest tokens may give way to second choices higher up: a
    doubtful trunk token's alternative is often worth more than the tokens that would follow it. Laid out
    depth-first: the first path, the runners-up, then the draft's second choices, deepest first. No ``pool``: the
    trunk and the draft's second choices only."""
    trunk_len = len(proposal.tokens)
    reach = reach_of(trunk_chances[:trunk_len] if trunk_chances is not None else [rates.trunk] * trunk_len)
    found = []
    if pool is not None:
        tail = pool.phrase_len
        found = pool.matches([int(token) for token in [*context[-tail:], *proposal.tokens][-tail:]], candidates)
    second_chances = runner_up_chances or {}
    seconds = sorted(
        ((i, token) for i, token in (runner_ups or {}).items() if i < trunk_len and token != proposal.tokens[i]),
        reverse=True,
    )
    values = [reach[1:]]
    if found:
        key, phrase, matched = found[0]
        values.append([reach[-1] * rates.suffix(matched) ** (j + 1) for j in range(budget)])
        values += [
            [reach[-1] * rates.branch * rates.suffix(m) ** j for j in range(len(p) - m)] for _, p, m in found[1:]
        ]
    else:
        values.append([])
    values += [[reach[i] * second_chances.get(i, rates.runner_up)] for i, _ in seconds]
    shares = _allocate(budget, values)
    trunk = shares[0]
    if trunk < trunk_len:  # the pool's nodes follow the whole trunk: none can have been chosen (worth less)
        del proposal.tokens[trunk:]
        proposal.trunk_len = min(proposal.trunk_len, trunk)
        shares[1 : 1 + len(found)] = [0] * len(found)
    if found and shares[1]:
        continuation = phrase[matched:]
        proposal.tokens.extend(continuation[: shares[1]])
        proposal.suffixes.append(SuffixUse(key, phrase, trunk, matched))
        if shares[1] > len(continuation):  # the first path goes on past its phrase, as a chain would
            lengthen(pool, proposal, context, trunk + shares[1])  # type: ignore[arg-type]
    parents = proposal.parents = list(range(-1, len(proposal.tokens) - 1))
    for rank, ((key, phrase, matched), share) in enumerate(zip(found[1:], shares[2 : 1 + len(found)], strict=True), 1):
        if share:
            offset = len(proposal.tokens)
            proposal.tokens.extend(phrase[matched:][:share])
            parents.extend([trunk - 1, *range(offset, offset + share - 1)])
            proposal.suffixes.append(SuffixUse(key, phrase, offset, matched, rank))
    for (i, token), share in zip(seconds, shares[1 + max(len(found), 1) :], strict=True):
        if share and i <= trunk:  # hung under trunk token i - 1, which must be proposed
            proposal.runner_ups.append(len(proposal.tokens))
            proposal.tokens.append(token)
            parents.append(i - 1)
    if not (proposal.alternatives or proposal.runner_ups):
        proposal.parents = None


def trunk_may_grow(
    trunk_chances: Sequence[float], runner_up_chances: Mapping[int, float], budget: int, next_chance: float
) -> bool:
    """Whether drafting one more trunk token can change a tree of ``budget`` nodes (:func:`lengthen_tree`): the
    next token, worth the trunk's reach so far times ``next_chance`` (the request's trunk rate), must beat some
    node already known (a trunk token, or a second choice beside one). When the budget is full of better nodes,
    the draft's forward would buy a node nobody proposes."""
    reach = reach_of(trunk_chances)
    next_value = reach[-1] * next_chance
    better = sum(1 for value in reach[1:] if value > next_value)
    depth = len(trunk_chances)
    better += sum(1 for i, chance in runner_up_chances.items() if i < depth and reach[i] * chance > next_value)
    return better < budget


def reach_of(chances: Sequence[float]) -> list[float]:
    """``reach[q]``: the chance that the first ``q`` trunk tokens are all accepted, each with ``chances[i]`` given the
    ones before it (``reach[0]`` is 1). Plain Python: a handful of numbers, asked once a forward per drafting row."""
    reach = [1.0]
    for chance in chances:
        reach.append(reach[-1] * chance)
    return reach


def _allocate(room: int, values: Sequence[Sequence[float]]) -> list[int]:
    """Nodes per candidate: each next node to the candidate whose next node is worth the most (``values[c][j]``:
    candidate c's j-th node, not increasing in j); the earlier candidate wins ties."""
    shares = [0] * len(values)
    for _ in range(room):
        open_ = [c for c, worth in enumerate(values) if shares[c] < len(worth)]
        if not open_:
            break
        best = max(open_, key=lambda c: (values[c][shares[c]], -c))
        shares[best] += 1
    return shares


def suffix_counts(proposal: Proposal, accepted_nodes: Sequence[int]) -> DraftStats:
    """The proposed and accepted tokens of the suffixes whose phrase matched the chain on more than its key, and of
    the first path's suffixes whose phrase matched it on its key alone (the other key-only ones are alternative
    branches), when the target accepted ``accepted_nodes``."""
    counts, accepted = DraftStats(), set(accepted_nodes)
    for use, end in zip(proposal.suffixes, proposal.suffix_ends(), strict=True):
        taken = len(accepted.intersection(range(use.offset, end)))
        if use.matched:
            counts.matched_suffix_tokens += end - use.offset
            counts.matched_suffix_accepted_tokens += taken
        elif not use.rank:
            counts.first_path_key_only_tokens += end - use.offset
            counts.first_path_key_only_accepted_tokens += taken
    return counts


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
