"""A draft tree: what the target verifies in one forward when several candidates continue the same prefix.

Nodes are flattened depth-first with the most likely path first, each with its parent's index (-1: the root,
the request's last verified token, which the target computes in the same forward). Row ``j`` of the target's
forward is the root for ``j = 0`` and node ``j - 1`` otherwise, so ``row_argmax[0]`` is the target's token after
the root and ``row_argmax[i + 1]`` its token after node ``i`` (given node ``i``'s ancestors only).

A chain is the tree whose parents are ``-1, 0, 1, ...``: everything here reduces to vLLM's chain verification
for it. Any prefix of a depth-first flattening is again a tree (``parents[i] < i``), so vLLM's scheduler may
cut a proposal short without breaking it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT = -1


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # parents[i] < i, ROOT for the root's children

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    def first_path_len(self) -> int:
        """Nodes on the first depth-first path (a chain prefix: the target's causal attention is already right
        for them)."""
        for i, parent in enumerate(self.parents):
            if parent != i - 1:
                return i
        return len(self.parents)

    def depths(self) -> list[int]:
        """Each node's distance from the root (the root's children: 1)."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 if parent == ROOT else depths[parent] + 1)
        return depths

    def children(self, node: int) -> list[int]:
        return [i for i, parent in enumerate(self.parents) if parent == node]

    def child_with(self, node: int, token: int) -> int | None:
        return next((i for i, parent in enumerate(self.parents) if parent == node and self.tokens[i] == token), None)

    def truncated(self, num_nodes: int) -> DraftTree:
        return DraftTree(self.tokens[:num_nodes], self.parents[:num_nodes])

    def check(self) -> None:
        """Raise ValueError unless this is a depth-first flattened tree with distinct sibling tokens."""
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.parents)} parents")
        seen: set[tuple[int, int]] = set()
        open_path: list[int] = []  # the nodes a depth-first walk has open: a new node hangs under one of them
        for i, (token, parent) in enumerate(zip(self.tokens, self.parents, strict=True)):
            if not ROOT <= parent < i:
                raise ValueError(f"node {i}: parent {parent} is not an earlier node or the root")
            if (parent, token) in seen:
                raise ValueError(f"node {i}: a sibling under {parent} already holds token {token}")
            seen.add((parent, token))
            while open_path and open_path[-1] != parent:
                open_path.pop()
            if parent != ROOT and not open_path:
                raise ValueError(f"node {i} hangs under {parent}, whose subtree is already closed")
            open_path.append(i)


def walk(tree: DraftTree, row_argmax: Sequence[int]) -> tuple[list[int], int]:
    """Greedy verification: from the root, descend to the child holding the target's token while there is one.
    Returns the accepted nodes (root to leaf) and the target's token after the last of them."""
    if len(row_argmax) != len(tree) + 1:
        raise ValueError(f"need {len(tree) + 1} target tokens (the root's and one per node), got {len(row_argmax)}")
    path: list[int] = []
    node = ROOT
    while True:
        token = int(row_argmax[node + 1])
        child = tree.child_with(node, token)
        if child is None:
            return path, token
        path.append(child)
        node = child


def accepted_path(tree: DraftTree, emitted: Sequence[int]) -> list[int]:
    """The nodes whose tokens the target emitted: ``emitted`` is the accepted tokens then the target's own."""
    path: list[int] = []
    node = ROOT
    for token in emitted[:-1]:
        child = tree.child_with(node, int(token))
        if child is None:
            break
        path.append(child)
        node = child
    return path


def predictions_along(tree: DraftTree, row_argmax: Sequence[int], start: int, count: int) -> list[int]:
    """The target's tokens at node ``start``'s position and after it, following each node's first child: what
    the target predicted along that branch (up to ``count``). For a chain this is ``row_argmax[start:][:count]``."""
    predictions = [int(row_argmax[tree.parents[start] + 1])]
    node: int | None = start
    while node is not None and len(predictions) < count:
        predictions.append(int(row_argmax[node + 1]))
        node = next((i for i in range(node + 1, len(tree)) if tree.parents[i] == node), None)
    return predictions[:count]
