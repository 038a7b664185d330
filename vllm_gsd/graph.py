"""The token graph of one request for one draft step, and its flattened tree.

GSD (arXiv 2407.16207) drafts a tree level by level but merges a candidate
into an existing node when both would continue the same text: same token and
same `merge_context` (tau) preceding tokens. The draft then skips the
merged candidate's whole subtree, which is where GSD saves draft compute. The
target cannot take that shortcut: it must score every path in its own true
context, so `TokenGraph.unroll` expands the DAG back into a tree (a node
reached by k paths appears k times) and flattens it into a `FlatTree`, the
one structure every later stage (target pass, acceptance, KV fix-up) reads.

Differences from the reference code (research notes §3.3, §10), on purpose:
  * the merge registry is a dict keyed by (token, tau preceding tokens), not
    a scan over all nodes;
  * a merge that would close a cycle is refused, so the graph is a true DAG;
  * a node keeps every merged child (the reference kept one `pseudo_child`
    and silently dropped the rest);
  * probability pruning really prunes (on the path probability), and the
    verification budget is filled by path probability instead of BFS order.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

ROOT = 0
"""Id of the root node in `TokenGraph` (the last sampled token)."""


class Node(NamedTuple):
    """One DAG node as it was created."""

    token: int
    parent: int
    """The node it was drafted under (its creation parent); -1 for the root."""
    level: int
    """The draft step that created it; the root is level 0."""
    path_prob: float
    """Product of the draft's conditional probabilities along the creation path."""


class Edge(NamedTuple):
    """An edge parent -> child, stored on the parent."""

    child: int
    prob: float
    """The draft's conditional probability q of child's token given the parent."""
    merged: bool
    """True when the edge points to a node that was created under another parent."""


class _Candidate(NamedTuple):
    path_prob: float
    order: int
    """Position of the parent in the frontier."""
    rank: int
    """Position among the parent's top-k."""
    parent: int
    token: int
    prob: float


class TokenGraph:
    """The token DAG of one request for one draft step.

    Node 0 is the root. Nodes are added only by `expand`, one level per
    draft forward pass, and every node is expanded at most once.
    """

    def __init__(self, context: Sequence[int], merge_context: int, max_nodes: int):
        """
        Args:
            context: the request's accepted tokens, ending with the root
                token; only the last `merge_context + 1` are kept.
            merge_context: tau. -1 disables merging, 0 merges on the token
                alone, tau > 0 also requires the tau preceding tokens to match.
            max_nodes: cap on the number of nodes, root included (the draft
                compute budget).
        """
        if len(context) == 0:
            raise ValueError("context must end with the root token; got an empty context")
        if merge_context < -1:
            raise ValueError(f"merge_context must be -1 (off), 0 or positive; got {merge_context}")
        if max_nodes < 1:
            raise ValueError(f"max_nodes must be at least 1 (the root); got {max_nodes}")
        self.merge_context = merge_context
        self.max_nodes = max_nodes
        self.num_merged = 0
        """Merge edges added: candidates that cost no new node."""
        self.num_pruned = 0
        """Candidates dropped by the sibling or the node-probability threshold."""
        self.num_over_budget = 0
        """Candidates dropped because the graph already had `max_nodes` nodes."""

        self._nodes = [Node(int(context[-1]), -1, 0, 1.0)]
        self._edges: list[list[Edge]] = [[]]
        # Every parent of a node, merge parents included: the cycle check
        # walks these upwards.
        self._in_nodes: list[list[int]] = [[]]
        # The last tau tokens of each node's history (context + creation
        # path), so a candidate's merge key costs O(tau), not a path walk.
        root_tail = context[-merge_context:] if merge_context > 0 else ()
        self._tails = [tuple(int(t) for t in root_tail)]
        self._registry: dict[tuple, int] = {}
        self._expanded: set[int] = set()

    @property
    def num_nodes(self) -> int:
        return len(self._nodes)

    def node(self, node: int) -> Node:
        return self._nodes[node]

    def edges(self, node: int) -> tuple[Edge, ...]:
        """Out-edges of `node`, created and merged, in the order they were added."""
        return tuple(self._edges[node])

    def creation_path(self, node: int) -> list[int]:
        """Node ids from the root to `node` along creation parents.

        This is the context the draft computed `node` in (its draft attention
        sees exactly these nodes on top of the request's KV).
        """
        path = []
        while node != -1:
            path.append(node)
            node = self._nodes[node].parent
        return path[::-1]

    def expand(
        self,
        frontier: Sequence[int],
        candidate_tokens: Sequence[Sequence[int]],
        candidate_probs: Sequence[Sequence[float]],
        sibling_ratio: float,
        min_node_prob: float,
    ) -> list[int]:
        """Add one level: the draft's top-k candidates of every frontier node.

        Args:
            frontier: [f] node ids the draft just ran on; each must not have
                been expanded before.
            candidate_tokens: [f][k] distinct tokens per frontier node, by
                descending probability.
            candidate_probs: [f][k] the draft's conditional probabilities.
            sibling_ratio: keep a candidate only if q >= sibling_ratio * top q.
            min_node_prob: drop a candidate whose path probability is below this.

        Returns:
            Ids of the nodes created, in creation order: the next frontier.
        """
        if not len(frontier) == len(candidate_tokens) == len(candidate_probs):
            raise ValueError(
                f"frontier, candidate_tokens and candidate_probs must have one entry per "
                f"frontier node; got {len(frontier)}, {len(candidate_tokens)}, {len(candidate_probs)}"
            )
        candidates = []
        for order, (parent, tokens, probs) in enumerate(zip(frontier, candidate_tokens, candidate_probs)):
            self._mark_expanded(parent)
            candidates += self._surviving_candidates(order, parent, tokens, probs, sibling_ratio, min_node_prob)

        # Most probable first, so that when the node budget runs out it is the
        # least probable continuations of the level that are lost.
        candidates.sort(key=lambda c: (-c.path_prob, c.order, c.rank))
        created = []
        for c in candidates:
            key = self._merge_key(c.token, c.parent)
            target = self._registry.get(key) if key is not None else None
            if target is not None and self._can_merge(c.parent, target):
                self._add_edge(c.parent, Edge(target, c.prob, merged=True))
                self.num_merged += 1
            elif self.num_nodes < self.max_nodes:
                created.append(self._create(c.token, c.parent, c.prob))
                if key is not None:
                    # A refused merge leaves the first node with this key in
                    # place: it is the one whose subtree is (or will be) drafted.
                    self._registry.setdefault(key, created[-1])
            else:
                self.num_over_budget += 1
        return created

    def unroll(self, max_tree_nodes: int, max_depth: int) -> FlatTree:
        """Expand the DAG into the token tree the target verifies, then flatten it.

        A tree node is a DAG node together with one path from the root to it,
        so a DAG node reached by k paths appears k times. Of all tree nodes up
        to `max_depth`, the `max_tree_nodes` most probable (product of edge
        probabilities along their path) are kept. A child is only discovered
        once its parent is kept and never outranks it (q <= 1), so the kept
        set is closed under ancestors.

        Returns:
            The kept nodes flattened in DFS preorder, children by descending
            probability: the first branch follows the most probable child at
            every step (the draft's greedy path).
        """
        # Heap entries: (-path prob, discovery order, dag node, tree parent, depth).
        heap: list[tuple[float, int, int, int, int]] = []
        discovered = 0

        def discover_children(dag_node: int, tree_node: int, prob: float, depth: int) -> None:
            nonlocal discovered
            if depth >= max_depth:
                return
            for edge in self._edges[dag_node]:
                heapq.heappush(heap, (-prob * edge.prob, discovered, edge.child, tree_node, depth + 1))
                discovered += 1

        kept: list[tuple[int, int, float, int]] = []  # (dag node, tree parent, prob, depth)
        tree_children: list[list[int]] = []
        root_children: list[int] = []
        discover_children(ROOT, -1, 1.0, 0)
        while heap and len(kept) < max_tree_nodes:
            neg_prob, _, dag_node, tree_parent, depth = heapq.heappop(heap)
            tree_node = len(kept)
            kept.append((dag_node, tree_parent, -neg_prob, depth))
            tree_children.append([])
            # Pop order is by descending probability, so each children list is
            # already in the order the DFS below must visit it.
            (tree_children[tree_parent] if tree_parent >= 0 else root_children).append(tree_node)
            discover_children(dag_node, tree_node, -neg_prob, depth)

        flat_index = {}
        tokens, parents, depths, probs = [], [], [], []
        stack = root_children[::-1]
        while stack:
            tree_node = stack.pop()
            dag_node, tree_parent, prob, depth = kept[tree_node]
            flat_index[tree_node] = len(tokens)
            tokens.append(self._nodes[dag_node].token)
            parents.append(flat_index[tree_parent] if tree_parent >= 0 else -1)
            depths.append(depth)
            probs.append(prob)
            stack += tree_children[tree_node][::-1]
        return FlatTree(tuple(tokens), tuple(parents), tuple(depths), tuple(probs))

    def _tail(self, history: tuple[int, ...]) -> tuple[int, ...]:
        return history[-self.merge_context :] if self.merge_context > 0 else ()

    def _merge_key(self, token: int, parent: int) -> tuple | None:
        """(token, the tau tokens before it) for a candidate; None when merging is off."""
        if self.merge_context < 0:
            return None
        return (token, self._tails[parent])

    def _can_merge(self, parent: int, target: int) -> bool:
        """Whether the edge parent -> target keeps the graph acyclic.

        target cannot already be a child of parent: parent is expanded once,
        with distinct candidate tokens, and target carries this candidate's token.
        """
        return not self._is_ancestor_or_self(target, parent)

    def _is_ancestor_or_self(self, candidate: int, node: int) -> bool:
        """Whether `candidate` is `node` or reaches it through any edges."""
        seen = {node}
        stack = [node]
        while stack:
            current = stack.pop()
            if current == candidate:
                return True
            for parent in self._in_nodes[current]:
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return False

    def _surviving_candidates(
        self,
        order: int,
        parent: int,
        tokens: Sequence[int],
        probs: Sequence[float],
        sibling_ratio: float,
        min_node_prob: float,
    ) -> list[_Candidate]:
        if len(tokens) != len(probs):
            raise ValueError(
                f"node {parent}: {len(tokens)} candidate tokens but {len(probs)} candidate probabilities"
            )
        tokens = [int(t) for t in tokens]
        probs = [float(q) for q in probs]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"node {parent}: candidate tokens must be distinct (the draft's top-k); got {tokens}")
        if not tokens:
            return []
        parent_prob = self._nodes[parent].path_prob
        top = max(probs)
        survivors = []
        for rank, (token, q) in enumerate(zip(tokens, probs)):
            if q >= sibling_ratio * top and parent_prob * q >= min_node_prob:
                survivors.append(_Candidate(parent_prob * q, order, rank, parent, token, q))
            else:
                self.num_pruned += 1
        return survivors

    def _mark_expanded(self, node: int) -> None:
        # A second expansion could give a node two children with the same
        # token, and acceptance relies on siblings having distinct tokens.
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"frontier node {node} does not exist (graph has {self.num_nodes} nodes)")
        if node in self._expanded:
            raise ValueError(f"node {node} was already expanded; each node is expanded once")
        self._expanded.add(node)

    def _create(self, token: int, parent: int, prob: float) -> int:
        node = self.num_nodes
        parent_node = self._nodes[parent]
        self._nodes.append(Node(token, parent, parent_node.level + 1, parent_node.path_prob * prob))
        self._edges.append([])
        self._in_nodes.append([])
        self._tails.append(self._tail(self._tails[parent] + (token,)))
        self._add_edge(parent, Edge(node, prob, merged=False))
        return node

    def _add_edge(self, parent: int, edge: Edge) -> None:
        self._edges[parent].append(edge)
        self._in_nodes[edge.child].append(parent)


@dataclass(frozen=True)
class Branch:
    """A maximal run of flat nodes that each continue the previous one.

    Nodes start..end (inclusive) form one path; attention "branch replay"
    runs them causally over `ancestors + (start..end)`.
    """

    start: int
    end: int
    ancestors: tuple[int, ...]
    """Flat indices of start's ancestors by depth, root excluded."""


@dataclass(frozen=True)
class FlatTree:
    """A draft token tree flattened so that parents come before children.

    Every stage after drafting passes this along. Row 0 of the target pass is
    the root (not stored here); flat node j is row j + 1.
    """

    tokens: tuple[int, ...]
    """[n] draft tokens, root excluded."""
    parents: tuple[int, ...]
    """[n] flat index of the parent; -1 = the root."""
    depths: tuple[int, ...]
    """[n] 1 = child of the root."""
    probs: tuple[float, ...]
    """[n] draft probability of the path from the root to the node."""
    _children: dict[tuple[int, int], int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not len(self.parents) == len(self.depths) == len(self.probs) == n:
            raise ValueError(
                f"tokens, parents, depths and probs must have equal lengths; got "
                f"{n}, {len(self.parents)}, {len(self.depths)}, {len(self.probs)}"
            )
        children = {}
        for j, (token, parent, depth) in enumerate(zip(self.tokens, self.parents, self.depths)):
            if not -1 <= parent < j:
                raise ValueError(f"node {j}: parent {parent} must be -1 or an earlier node")
            if depth != (self.depths[parent] + 1 if parent >= 0 else 1):
                raise ValueError(f"node {j}: depth {depth} is not its parent's depth + 1")
            if (parent, token) in children:
                raise ValueError(f"node {j}: token {token} repeats a sibling's; siblings must differ")
            children[(parent, token)] = j
        object.__setattr__(self, "_children", children)

    @staticmethod
    def chain(tokens: Sequence[int]) -> FlatTree:
        """A linear draft (what vLLM's own proposers produce) as a tree."""
        n = len(tokens)
        return FlatTree(tuple(int(t) for t in tokens), tuple(range(-1, n - 1)), tuple(range(1, n + 1)), (1.0,) * n)

    def __len__(self) -> int:
        return len(self.tokens)

    def child(self, parent: int, token: int) -> int | None:
        """Flat index of `parent`'s child with `token` (parent -1 = the root), or None."""
        return self._children.get((parent, token))

    def truncated(self, n: int) -> FlatTree:
        """The first n nodes; a valid tree because parents precede children."""
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot truncate a tree of {len(self)} nodes to {n}")
        return FlatTree(self.tokens[:n], self.parents[:n], self.depths[:n], self.probs[:n])

    def subtree(self, kept: Sequence[int]) -> FlatTree:
        """The tree of the `kept` flat indices (ascending, closed under
        ancestors), in the same flat order, parents renumbered."""
        index = {j: i for i, j in enumerate(kept)}
        parents = []
        for j in kept:
            parent = self.parents[j]
            if parent >= 0 and parent not in index:
                raise ValueError(f"node {j} is kept without its parent {parent}")
            parents.append(index[parent] if parent >= 0 else -1)
        return FlatTree(tuple(self.tokens[j] for j in kept), tuple(parents),
                        tuple(self.depths[j] for j in kept),
                        tuple(self.probs[j] for j in kept))

    def with_path(self, tokens: Sequence[int]) -> tuple[FlatTree, list[int]]:
        """This tree with the path `tokens` from the root added: the nodes it
        shares with the tree are reused, the others appended as one new
        branch, with draft probability 0 (the draft did not propose them).
        Returns the tree and the flat indices of the path's nodes."""
        path: list[int] = []
        node = -1
        for token in tokens:
            child = self.child(node, int(token))
            if child is None:
                break
            path.append(node := child)
        new = [int(t) for t in tokens[len(path):]]
        if not new:
            return self, path
        n, depth = len(self), len(path)
        tree = FlatTree(self.tokens + tuple(new),
                        self.parents + (node, *range(n, n + len(new) - 1)),
                        self.depths + tuple(range(depth + 1, depth + len(new) + 1)),
                        self.probs + (0.0,) * len(new))
        return tree, path + list(range(n, n + len(new)))

    def ancestor_mask(self) -> np.ndarray:
        """bool [n, n]: mask[i, j] is True when j is i or an ancestor of i."""
        n = len(self)
        mask = np.zeros((n, n), dtype=bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                mask[i] = mask[parent]
            mask[i, i] = True
        return mask

    def run_starts(self) -> set[int]:
        """Flat nodes that do not continue the previous node (its parent is
        another node), node 0 included: each starts a run of `branches`."""
        return {j for j, parent in enumerate(self.parents) if j == 0 or parent != j - 1}

    def branches(self) -> list[Branch]:
        """Split the flat order into maximal runs where each node's parent is the previous node."""
        starts = sorted(self.run_starts())
        ends = [start - 1 for start in starts[1:]] + [len(self) - 1]
        return [Branch(start, end, self.ancestors(start)) for start, end in zip(starts, ends)]

    def ancestors(self, node: int) -> tuple[int, ...]:
        """Flat indices of the node's ancestors, shallowest first."""
        ancestors = []
        parent = self.parents[node]
        while parent >= 0:
            ancestors.append(parent)
            parent = self.parents[parent]
        return tuple(ancestors[::-1])

