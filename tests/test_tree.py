"""Draft trees (pure): layout, greedy walk, the accepted path, predictions per branch, and tree proposals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.algorithm.proposal import (
    Proposal,
    TreeRates,
    _allocate,
    apply_feedback,
    lengthen,
    lengthen_tree,
    suffix_counts,
    trunk_may_grow,
)
from ouroboros_vllm.algorithm.request import DraftSettings, RequestState
from ouroboros_vllm.algorithm.tree import ROOT, DraftTree, accepted_path, predictions_along, walk


@st.composite
def trees(draw: st.DrawFn, max_nodes: int = 12, vocab: int = 5) -> DraftTree:
    """Random depth-first trees with distinct sibling tokens, built as a proposer builds them."""
    tree = DraftTree()
    for _ in range(draw(st.integers(0, max_nodes))):
        parent = draw(st.integers(ROOT, len(tree) - 1))
        # Only a node on the open depth-first path may take a child.
        open_path = [ROOT]
        node = len(tree) - 1
        while node != ROOT:
            open_path.append(node)
            node = tree.parents[node]
        if parent not in open_path:
            continue
        free = [t for t in range(vocab) if tree.child_with(parent, t) is None]
        if free:
            tree.tokens.append(draw(st.sampled_from(free)))
            tree.parents.append(parent)
    return tree


def chain_walk(tokens: list[int], argmax: list[int]) -> tuple[list[int], int]:
    """vLLM's greedy chain acceptance, as the reference for chains."""
    accepted = 0
    while accepted < len(tokens) and tokens[accepted] == argmax[accepted]:
        accepted += 1
    return list(range(accepted)), argmax[accepted]


@given(st.lists(st.integers(0, 4), max_size=8), st.data())
def test_on_a_chain_the_walk_is_vllm_chain_acceptance(tokens, data):
    argmax = data.draw(st.lists(st.integers(0, 4), min_size=len(tokens) + 1, max_size=len(tokens) + 1))
    tree = DraftTree.chain(tokens)
    assert tree.first_path_len() == len(tokens)
    assert walk(tree, argmax) == chain_walk(tokens, argmax)
    assert predictions_along(tree, argmax, 0, len(tokens) + 1) == argmax if tokens else True


@given(trees(), st.data())
def test_the_walk_follows_the_target_and_the_emitted_tokens_find_the_same_path(tree, data):
    tree.check()
    argmax = data.draw(st.lists(st.integers(0, 4), min_size=len(tree) + 1, max_size=len(tree) + 1))
    path, next_token = walk(tree, argmax)
    node = ROOT
    for child in path:  # each accepted node holds the target's token at its parent and hangs under it
        assert tree.parents[child] == node and tree.tokens[child] == argmax[node + 1]
        node = child
    assert tree.child_with(node, argmax[node + 1]) is None and next_token == argmax[node + 1]
    emitted = [tree.tokens[i] for i in path] + [next_token]
    assert accepted_path(tree, emitted) == path
    depths = tree.depths()
    assert [depths[i] for i in path] == list(range(1, len(path) + 1))


@given(trees(), st.integers(0, 12))
def test_every_prefix_of_a_tree_is_a_tree(tree, cut):
    tree.truncated(cut).check()


def test_check_refuses_what_is_not_a_depth_first_tree():
    with pytest.raises(ValueError, match="sibling"):
        DraftTree([1, 1], [ROOT, ROOT]).check()
    with pytest.raises(ValueError, match="earlier node"):
        DraftTree([1, 2], [ROOT, 1]).check()
    with pytest.raises(ValueError, match="closed"):  # node 3 hangs under node 1, whose subtree ended at node 2
        DraftTree([1, 2, 3, 4], [ROOT, 0, ROOT, 1]).check()


def test_junk_first_and_the_truth_second_is_accepted_in_full():
    truth, junk = [7, 8, 9], [1, 2, 3]
    tree = DraftTree(junk + truth, [ROOT, 0, 1, ROOT, 3, 4])
    argmax = [7, 0, 0, 0, 8, 9, 10]  # the root's row, then one per node: the truth continues with 10
    assert walk(tree, argmax) == ([3, 4, 5], 10)
    assert predictions_along(tree, argmax, 3, 4) == [7, 8, 9, 10]


def suffix_values(room: int, caps: list[int], pool: float, branch: float) -> list[list[float]]:
    """The first path's and the runners-up's node values, as lengthen_tree computes them after an empty trunk."""
    return [[pool ** (j + 1) for j in range(room)]] + [[branch * pool**j for j in range(cap)] for cap in caps]


def test_allocation_goes_where_acceptance_is_likeliest():
    # A sure first path keeps every node; a doubtful one gives its tail to the runners-up.
    assert _allocate(4, suffix_values(4, [3, 3], 0.9, 0.1)) == [4, 0, 0]
    assert _allocate(4, suffix_values(4, [3, 3], 0.3, 0.25)) == [2, 1, 1]
    assert _allocate(6, suffix_values(6, [1, 1], 0.2, 0.5)) == [4, 1, 1]  # the runners-up have one token each
    assert _allocate(3, [[0.5], [0.4, 0.3], []]) == [1, 2, 0]


def rates(
    pool: float, branch: float, trunk: float = 1.0, runner_up: float = 0.0, key_only: float | None = None
) -> TreeRates:
    key_only = pool if key_only is None else key_only
    return TreeRates(trunk=trunk, pool=pool, branch=branch, runner_up=runner_up, pool_key_only=key_only)


def pool_with(*phrases: tuple[int, tuple[int, ...]]) -> PhrasePool:
    pool = PhrasePool(phrase_len=3, max_phrases_per_key=8, max_keys=64, max_phrases=256)
    for key, phrase in phrases:
        pool.insert(key, phrase)
    return pool


def test_matches_ranks_longer_matches_first_with_distinct_first_tokens():
    pool = pool_with((5, (6, 7, 8)), (6, (1, 2, 3)), (6, (7, 9, 9)), (6, (4, 4, 4)), (6, (1, 5, 5)))
    found = pool.matches([5, 6], 3)
    assert found[0] == (5, (6, 7, 8), 1)  # matched [6] after key 5: continues with 7
    assert [phrase[matched] for _, phrase, matched in found] == [7, 1, 4]  # newest first among key-only; 7 taken
    assert pool.match([5, 6]) == found[0]


def test_a_tree_proposal_puts_the_runners_up_under_the_trunk_end():
    pool = pool_with((3, (10, 11, 12)), (3, (20, 21, 22)), (3, (30, 31, 32)))
    proposal = Proposal(tokens=[2, 3], trunk_len=2)
    lengthen_tree(pool, proposal, [1], 6, 3, rates(0.3, 0.25))
    tree = proposal.tree()
    tree.check()
    assert tree.tokens[:2] == [2, 3] and len(tree) == 6
    assert sorted(tree.tokens[i] for i in tree.children(1)) == [10, 20, 30]  # the newest phrase on the first path
    assert tree.tokens[2] == 30 and [use.rank for use in proposal.suffixes] == [0, 1, 2]


def test_key_only_suffix_tokens_are_counted_apart_on_the_first_path_and_on_alternatives():
    pool = pool_with((3, (10, 11, 12)), (3, (20, 21, 22)), (3, (30, 31, 32)))
    proposal = Proposal(tokens=[2, 3], trunk_len=2)
    lengthen_tree(pool, proposal, [1], 6, 3, rates(0.3, 0.25))
    assert proposal.tokens == [2, 3, 30, 31, 20, 10]  # every phrase matched its key alone
    counts = suffix_counts(proposal, [0, 1, 4])  # the target took the trunk, then the first alternative's 20
    assert (counts.first_path_key_only_tokens, counts.first_path_key_only_accepted_tokens) == (2, 0)
    assert counts.matched_suffix_tokens == 0


def test_a_sure_first_path_makes_the_same_proposal_as_a_chain():
    pool = pool_with((3, (10, 11, 12)), (3, (20, 21, 22)), (12, (13, 14, 15)))
    chain, tree = Proposal(tokens=[3], trunk_len=1), Proposal(tokens=[3], trunk_len=1)
    lengthen(pool, chain, [1], 6)
    lengthen_tree(pool, tree, [1], 6, 3, rates(0.95, 0.05))
    assert tree.parents is None and tree.tokens == chain.tokens and tree.suffixes == chain.suffixes


def test_a_suffix_that_matched_its_key_alone_is_priced_at_its_own_rate():
    # Trunk [2, 3] (0.9 each) after context [1]. Under key 2, (3, 4, 5) matches the chain's last token past its key;
    # under key 3, (10, 11, 12) matches the key alone. The suffix's first token is worth 0.81 * rate: 0.243 for the
    # matched one (rate 0.3), 0.0405 for the key-only one (0.05), against 0.1 and 0.09 for the draft's second
    # choices at positions 0 and 1. The last node of a budget of 4 goes to the best of them.
    context_matched, key_only = pool_with((2, (3, 4, 5))), pool_with((3, (10, 11, 12)))
    cases = ((context_matched, 0.05, [2, 3, 4, 7]), (key_only, 0.05, [2, 3, 8, 7]), (key_only, 0.3, [2, 3, 10, 7]))
    for pool, key_only_rate, expected in cases:
        proposal = Proposal(tokens=[2, 3], trunk_len=2)
        tree_rates = rates(0.3, 0.0, runner_up=0.1, key_only=key_only_rate)
        lengthen_tree(pool, proposal, [1], 4, 1, tree_rates, {0: 7, 1: 8}, [0.9, 0.9], {0: 0.1, 1: 0.1})
        assert proposal.tokens == expected


def test_a_request_learns_the_rate_of_key_only_suffixes_apart():
    pool = pool_with((2, (3, 4, 5)), (3, (10, 11, 12)))
    for context, key_only in (([1, 2, 3], False), ([9, 9, 3], True)):
        state = RequestState(settings(), pool)
        state.proposal = Proposal(tokens=[3], trunk_len=1)
        lengthen(pool, state.proposal, context[:-1], 3)
        assert state.proposal.key_only_suffix == key_only
        state.count_accepted([3, state.proposal.tokens[1], 0])  # the trunk and the suffix's first token
        rates_ = state.acceptance.rates
        assert (rates_["pool"].accepted, rates_["pool"].examined) == (1, 2)
        assert (rates_["pool_key_only"].accepted, rates_["pool_key_only"].examined) == ((1, 2) if key_only else (0, 0))


def settings(candidates: int = 3) -> DraftSettings:
    return DraftSettings(
        gamma=2, phrase_len=3, draft_phrases=0, lookahead_window=0, uses_pool=True, context_ngrams=False,
        num_candidates=candidates,
    )  # fmt: skip


def test_a_request_counts_what_a_tree_verification_accepted_per_source():
    pool = pool_with((3, (10, 11, 12)), (3, (20, 21, 22)))
    state = RequestState(settings(), pool, tree=True)
    state.proposal = Proposal(tokens=[2, 3], trunk_len=2)
    lengthen_tree(pool, state.proposal, [1], 6, 3, rates(0.3, 0.3))
    tree = state.proposal.tree()
    first_alternative = tree.children(1)[1]
    assert tree.tokens[first_alternative:] == [10, 11]  # the older phrase is the runner-up
    row_argmax = [2, 3, 10] + [0] * (len(tree) - 2)  # the target takes the runner-up's tokens, then 0
    row_argmax[first_alternative + 1] = 11
    state.after_verification(tree.tokens, row_argmax, as_tree=True)
    path, next_token = walk(tree, row_argmax)
    counts = state.count_accepted([tree.tokens[i] for i in path] + [next_token])
    assert counts.accepted_tokens == 4 and counts.branch_accepted_tokens == 2
    assert counts.tree_rounds == 1 and counts.branch_rounds == 1
    assert state.acceptance.rates["branch"].accepted == 1


def test_a_tree_verified_as_a_chain_is_counted_and_refined_as_a_chain():
    pool = pool_with((3, (10, 11, 12)), (3, (20, 21, 22)))
    proposal = Proposal(tokens=[2, 3], trunk_len=2)
    lengthen_tree(pool, proposal, [1], 5, 2, rates(0.3, 0.3))
    assert proposal.parents is not None
    state = RequestState(settings(2), pool, tree=True)
    state.proposal = proposal
    argmax = [2, 3, 20, 0, 0, 0]  # chain rows: the runner-up's row saw the first path, not its parent
    state.after_verification(proposal.tokens, argmax, as_tree=False)
    # The first path (the newest phrase) is refined from its rows; the runner-up is left as it was.
    assert pool.phrases(3) == [(10, 11, 12), (20, 0, 0)]
    counts = state.count_accepted([2, 3, 20])
    assert counts.accepted_tokens == 2 and counts.tree_rounds == 0


def test_feedback_refines_a_branch_from_its_own_rows():
    pool = pool_with((3, (10, 11, 12)), (3, (20, 21, 22)))
    proposal = Proposal(tokens=[3], trunk_len=1)
    lengthen_tree(pool, proposal, [1], 7, 2, rates(0.3, 0.3))
    tree = proposal.tree()
    proposal.verified_as_tree = True
    alternative = tree.children(0)[1]
    row_argmax = [3, 10] + [0] * len(tree)
    row_argmax = row_argmax[: len(tree) + 1]
    for offset, token in enumerate([25, 26]):  # the target's tokens after the runner-up's nodes
        row_argmax[alternative + 1 + offset] = token
    apply_feedback(pool, proposal, tree.tokens, row_argmax)
    # refined from the branch's own rows: the target's token at its position (10: the key's), then after it
    assert (10, 25, 26) in pool.phrases(3)


def test_the_planner_values_a_tree_suffix_as_lengthen_tree_fills_it():
    from dataclasses import replace

    from ouroboros_vllm.algorithm.planner import RowOutlook, pool_gains

    chain = RowOutlook(budget=6, trunk_rate=0.9, pool_rate=0.3, pool_hit=1.0, can_draft=True)
    tree = replace(chain, alternatives=2, branch_len=3, branch_rate=0.25)
    assert pool_gains(chain, 4) == pytest.approx([0, 0.3, 0.39, 0.417])  # 0.3 + 0.3^2 + 0.3^3
    assert _allocate(4, suffix_values(4, [3, 3], 0.3, 0.25)) == [2, 1, 1]  # nodes worth 0.3, 0.25, 0.25, 0.09
    assert pool_gains(tree, 5) == pytest.approx([0, 0.3, 0.55, 0.8, 0.89])
    assert pool_gains(replace(tree, branch_rate=0.0), 5) == pytest.approx(pool_gains(chain, 5))


def test_the_drafts_second_choices_hang_beside_the_trunk_deepest_first():
    pool = pool_with((3, (10, 11, 12)))
    proposal = Proposal(tokens=[2, 3], trunk_len=2)
    # Trunk acceptance 0.5: the first path's pool tokens are worth 0.25 * 0.3, 0.25 * 0.09; second choices
    # 0.4 at position 0 and 0.5 * 0.4 at position 1: both beat the pool's second token.
    lengthen_tree(pool, proposal, [1], 5, 3, rates(0.3, 0.0, trunk=0.5, runner_up=0.4), {0: 7, 1: 8})
    tree = proposal.tree()
    tree.check()
    assert tree.tokens == [2, 3, 10, 8, 7] and tree.parents == [ROOT, 0, 1, 0, ROOT]
    assert proposal.runner_ups == [3, 4] and proposal.suffix_ends() == [3]
    state = RequestState(settings(), pool, tree=True)
    state.proposal = proposal
    row_argmax = [2, 8, 0, 0, 0, 0]  # trunk[0] accepted, then the target says 8: the second choice at position 1
    state.after_verification(tree.tokens, row_argmax, as_tree=True)
    path, next_token = walk(tree, row_argmax)
    assert path == [0, 3]
    counts = state.count_accepted([tree.tokens[i] for i in path] + [next_token])
    assert counts.accepted_tokens == 2 and counts.suffix_accepted_tokens == 0 and counts.branch_rounds == 1
    runner_up = state.acceptance.rates["runner_up"]
    assert (runner_up.accepted, runner_up.examined) == (1, 2)  # both second choices were reached


def test_a_doubtful_trunk_token_gets_its_second_choice_and_the_trunk_gives_way_below_it():
    proposal = Proposal(tokens=[2, 3, 4, 5], trunk_len=4)
    # Trunk token 1 is doubtful (0.3); the draft's second choice there is worth 0.95 * 0.6 = 0.57, more than
    # trunk tokens 1-3 (0.285, 0.257, 0.231): the budget of 4 keeps tokens 0-2 and the second choice.
    lengthen_tree(None, proposal, [1], 4, 1, rates(0.0, 0.0), {1: 9, 2: 8}, [0.95, 0.3, 0.9, 0.9], {1: 0.6, 2: 0.05})
    tree = proposal.tree()
    tree.check()
    assert tree.tokens == [2, 3, 4, 9] and tree.parents == [ROOT, 0, 1, 0]
    assert proposal.trunk_len == 3 and proposal.runner_ups == [3]


def test_sure_trunk_tokens_keep_the_whole_budget():
    proposal = Proposal(tokens=[2, 3, 4, 5], trunk_len=4)
    second = {0: 0.01, 1: 0.02}
    lengthen_tree(None, proposal, [1], 4, 1, rates(0.0, 0.0), {0: 9, 1: 8}, [0.99, 0.98, 0.99, 0.97], second)
    assert proposal.parents is None and proposal.tokens == [2, 3, 4, 5] and proposal.trunk_len == 4


def expected_accepted(proposal: Proposal, chances: list[float], second: dict[int, float]) -> float:
    """The expected accepted tokens of a proposal under the chances it was built with: a node is accepted when
    its parent is and the target picks it (a trunk token i with chances[i], a second choice beside trunk token i
    with second[i]; siblings exclude each other, so the nodes' chances add up)."""
    tree, total, chance_of = proposal.tree(), 0.0, {}
    for node, parent in enumerate(tree.parents):
        depth = tree.depths()[node] - 1  # the trunk position it sits at
        own = second[depth] if node in proposal.runner_ups else chances[depth]
        chance_of[node] = (1.0 if parent == ROOT else chance_of[parent]) * own
        total += chance_of[node]
    return total


@given(
    chances=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8),
    seconds=st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8),
    budget=st.integers(1, 8),
)
def test_a_draft_tree_expects_at_least_what_its_trunk_as_a_chain_does(chances, seconds, budget):
    """With the chances it is given, a tree of ``budget`` nodes (the trunk's first tokens and second choices beside
    them) expects at least as many accepted tokens as the trunk cut to ``budget`` as a chain: the best-first
    choice of nodes is the best set, and the chain's is one of the sets it could choose."""
    # A second choice takes what the first leaves: at most 1 - chances[i].
    second = {i: min(seconds[i], 1.0 - c) for i, c in enumerate(chances)}
    trunk = list(range(10, 10 + len(chances)))
    tree = Proposal(tokens=list(trunk), trunk_len=len(trunk))
    runner_ups = {i: 50 + i for i in range(len(chances))}
    lengthen_tree(None, tree, [1], budget, 1, rates(0.0, 0.0), runner_ups, chances, second)
    tree.tree().check()
    assert len(tree.tokens) <= budget and tree.tokens[: tree.trunk_len] == trunk[: tree.trunk_len]
    chain = Proposal(tokens=trunk[:budget], trunk_len=min(budget, len(trunk)))
    assert expected_accepted(tree, chances, second) >= expected_accepted(chain, chances, second) - 1e-9


def test_the_trunk_stops_growing_when_better_nodes_fill_the_budget():
    # Budget 3: trunk tokens worth 0.9 and 0.45 and a second choice worth 0.9 * 0.5: a third token worth at most
    # 0.45 * 0.8 = 0.36 would not be proposed.
    assert not trunk_may_grow([0.9, 0.5], {1: 0.5}, 3, 0.8)
    assert trunk_may_grow([0.9, 0.5], {1: 0.5}, 4, 0.8)  # room left
    assert trunk_may_grow([0.9, 0.5], {1: 0.1}, 3, 0.8)  # the second choice is worth less than the next token
    assert trunk_may_grow([0.99, 0.99], {}, 3, 0.9)


def test_the_draft_probabilities_of_verified_tokens_calibrate_the_process():
    from ouroboros_vllm.algorithm.acceptance import ProcessAcceptance

    prior = ProcessAcceptance()
    state = RequestState(settings(), PhrasePool(3, 8, 64, 256), prior=prior, tree=True)
    state.proposal = Proposal(tokens=[2, 3, 4, 9], trunk_len=3, parents=[ROOT, 0, 1, 0], runner_ups=[3],
                              trunk_probs=[0.97, 0.45, None], runner_up_probs=[0.35])  # fmt: skip
    state.after_verification(state.proposal.tokens, [2, 9, 0, 0, 0], as_tree=True)
    state.count_accepted([2, 9, 0])  # trunk token 0 accepted, 1 rejected, the second choice beside it taken
    first, second = prior.first_choice, prior.second_choice
    assert sum(first._examined) == 2 and sum(first._accepted) == 1
    assert sum(first._predicted) == pytest.approx(0.97 + 0.45)
    assert sum(second._examined) == 1 and sum(second._accepted) == 1 and sum(second._predicted) == pytest.approx(0.35)
