"""TokenGraph (merge, prune, budget, unroll) and FlatTree."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_gsd.graph import ROOT, Branch, FlatTree, TokenGraph

Draft = Callable[[tuple[int, ...]], tuple[list[int], list[float]]]

UNLIMITED = 10**9


def random_draft(seed: int, vocab: int, max_k: int, window: int | None) -> Draft:
    """A deterministic synthetic draft: history -> top-k (tokens, probabilities).

    Its output depends only on the last `window` tokens of the history (all of
    them when window is None), so with window = tau + 1 it is exactly the
    Markov model under which merging with merge_context = tau loses nothing.
    """

    def draft(history: tuple[int, ...]) -> tuple[list[int], list[float]]:
        seen = history if window is None else history[-window:]
        rng = np.random.default_rng([seed, len(seen), *seen])
        probs = np.sort(rng.dirichlet(np.ones(vocab)))[::-1]
        k = int(rng.integers(1, max_k + 1))
        tokens = rng.permutation(vocab)[:k]
        return [int(t) for t in tokens], [float(q) for q in probs[:k]]

    return draft


def history(graph: TokenGraph, context: Sequence[int], node: int) -> tuple[int, ...]:
    path = graph.creation_path(node)[1:]
    return tuple(context) + tuple(graph.node(n).token for n in path)


def grow(
    graph: TokenGraph,
    context: Sequence[int],
    draft: Draft,
    levels: int,
    sibling_ratio: float = 0.0,
    min_node_prob: float = 0.0,
) -> TokenGraph:
    """Run `levels` draft steps, each on the nodes the previous one created."""
    frontier = [ROOT]
    for _ in range(levels):
        if not frontier:
            break
        drafts = [draft(history(graph, context, node)) for node in frontier]
        frontier = graph.expand(
            frontier, [d[0] for d in drafts], [d[1] for d in drafts], sibling_ratio, min_node_prob
        )
    return graph


def dag_token_paths(graph: TokenGraph, max_depth: int) -> list[tuple[int, ...]]:
    """Token sequences of every DAG path from the root, root excluded, up to max_depth."""
    paths = []
    stack = [(ROOT, ())]
    while stack:
        node, tokens = stack.pop()
        if len(tokens) == max_depth:
            continue
        for edge in graph.edges(node):
            path = tokens + (graph.node(edge.child).token,)
            paths.append(path)
            stack.append((edge.child, path))
    return paths


def tree_token_paths(tree: FlatTree) -> list[tuple[int, ...]]:
    paths: list[tuple[int, ...]] = []
    for parent, token in zip(tree.parents, tree.tokens):
        paths.append((paths[parent] if parent >= 0 else ()) + (token,))
    return paths


def is_acyclic(graph: TokenGraph) -> bool:
    """Kahn's algorithm: every node gets removed iff there is no cycle."""
    indegree = Counter(edge.child for n in range(graph.num_nodes) for edge in graph.edges(n))
    ready = [n for n in range(graph.num_nodes) if indegree[n] == 0]
    removed = 0
    while ready:
        node = ready.pop()
        removed += 1
        for edge in graph.edges(node):
            indegree[edge.child] -= 1
            if indegree[edge.child] == 0:
                ready.append(edge.child)
    return removed == graph.num_nodes


def merged_targets(graph: TokenGraph, node: int) -> list[int]:
    return [edge.child for edge in graph.edges(node) if edge.merged]


# Merging


def test_same_token_after_same_preceding_tokens_merges():
    graph = TokenGraph([5, 0], merge_context=1, max_nodes=UNLIMITED)
    a, b = graph.expand([ROOT], [[1, 2]], [[0.6, 0.4]], 0.0, 0.0)
    a3, b3 = graph.expand([a, b], [[3], [3]], [[0.9], [0.9]], 0.0, 0.0)
    # (4 after 3) is drafted under a->3 first; b->3 then has the same key.
    created = graph.expand([a3, b3], [[4], [4]], [[0.8], [0.8]], 0.0, 0.0)

    assert len(created) == 1
    assert merged_targets(graph, b3) == created
    assert graph.num_merged == 1
    assert graph.num_nodes == 6


def test_same_token_after_different_preceding_tokens_does_not_merge():
    graph = TokenGraph([5, 0], merge_context=1, max_nodes=UNLIMITED)
    a, b = graph.expand([ROOT], [[1, 2]], [[0.6, 0.4]], 0.0, 0.0)
    created = graph.expand([a, b], [[3], [3]], [[0.9], [0.9]], 0.0, 0.0)

    assert len(created) == 2
    assert graph.num_merged == 0


def test_merge_key_reaches_into_the_context():
    # With tau = 2 the two tokens before a candidate form its key, and for the
    # root's children those come from the context.
    def build(context):
        graph = TokenGraph(context, merge_context=2, max_nodes=UNLIMITED)
        _, c = graph.expand([ROOT], [[1, 2]], [[0.6, 0.4]], 0.0, 0.0)
        (d,) = graph.expand([c], [[0]], [[0.9]], 0.0, 0.0)
        graph.expand([d], [[1]], [[0.9]], 0.0, 0.0)
        return graph

    # The last candidate is 1 after (2, 0); the root's child 1 came after context[-2:].
    assert build([2, 0]).num_merged == 1
    assert build([7, 0]).num_merged == 0


def test_tau_zero_merges_on_token_alone_across_depths():
    graph = TokenGraph([0], merge_context=0, max_nodes=UNLIMITED)
    a, b = graph.expand([ROOT], [[1, 2]], [[0.6, 0.4]], 0.0, 0.0)
    created = graph.expand([a], [[2]], [[0.5]], 0.0, 0.0)

    assert created == []
    assert merged_targets(graph, a) == [b]
    assert graph.node(b).level == 1


def test_disabled_merging_never_merges():
    graph = TokenGraph([0], merge_context=-1, max_nodes=UNLIMITED)
    a, b = graph.expand([ROOT], [[1, 2]], [[0.6, 0.4]], 0.0, 0.0)
    created = graph.expand([a, b], [[2, 1], [1, 2]], [[0.5, 0.4], [0.5, 0.4]], 0.0, 0.0)

    assert len(created) == 4
    assert graph.num_merged == 0


def test_node_keeps_every_merged_child():
    # The reference's single pseudo_child kept only the last of these.
    graph = TokenGraph([0], merge_context=0, max_nodes=UNLIMITED)
    a, b, c = graph.expand([ROOT], [[1, 2, 3]], [[0.5, 0.3, 0.2]], 0.0, 0.0)
    created = graph.expand([a], [[2, 3]], [[0.6, 0.4]], 0.0, 0.0)

    assert created == []
    assert merged_targets(graph, a) == [b, c]
    assert graph.num_merged == 2
    tree = graph.unroll(UNLIMITED, max_depth=2)
    assert sorted(tree_token_paths(tree)) == [(1,), (1, 2), (1, 3), (2,), (3,)]


def test_merge_that_would_close_a_cycle_creates_a_node_instead():
    graph = TokenGraph([0], merge_context=0, max_nodes=UNLIMITED)
    a, b = graph.expand([ROOT], [[1, 2]], [[0.6, 0.4]], 0.0, 0.0)
    # a -> b merges first (more probable); b -> a would then close a -> b -> a.
    created = graph.expand([a, b], [[2], [1]], [[0.9], [0.9]], 0.0, 0.0)

    assert merged_targets(graph, a) == [b]
    assert len(created) == 1
    assert graph.node(created[0]).token == 1
    assert graph.node(created[0]).parent == b
    assert graph.num_merged == 1
    assert graph.num_nodes == 4
    assert is_acyclic(graph)


def test_refused_merge_keeps_the_first_node_as_merge_target():
    graph = TokenGraph([0], merge_context=0, max_nodes=UNLIMITED)
    a, b, c = graph.expand([ROOT], [[1, 2, 5]], [[0.5, 0.3, 0.2]], 0.0, 0.0)
    # a -> b merges; b -> 1 would close a cycle and gets its own node; c -> 1
    # (least probable, so last) must still merge into a, the first token-1 node.
    created = graph.expand([a, b, c], [[2], [1], [1]], [[0.9], [0.9], [0.9]], 0.0, 0.0)

    assert len(created) == 1
    assert merged_targets(graph, c) == [a]
    assert graph.num_merged == 2


def test_root_is_never_a_merge_target():
    graph = TokenGraph([0], merge_context=0, max_nodes=UNLIMITED)
    (a,) = graph.expand([ROOT], [[7]], [[0.9]], 0.0, 0.0)
    created = graph.expand([a], [[0]], [[0.9]], 0.0, 0.0)

    assert len(created) == 1
    assert graph.num_merged == 0


def test_merge_needs_no_node_budget():
    graph = TokenGraph([0], merge_context=0, max_nodes=3)
    a, b = graph.expand([ROOT], [[1, 2]], [[0.6, 0.4]], 0.0, 0.0)
    created = graph.expand([a], [[2, 9]], [[0.6, 0.4]], 0.0, 0.0)

    assert created == []
    assert graph.num_merged == 1
    assert graph.num_over_budget == 1


# Pruning and budget


def test_sibling_ratio_drops_candidates_far_below_the_best():
    graph = TokenGraph([0], merge_context=-1, max_nodes=UNLIMITED)
    created = graph.expand([ROOT], [[1, 2, 3]], [[0.5, 0.3, 0.2]], sibling_ratio=0.5, min_node_prob=0.0)

    assert [graph.node(n).token for n in created] == [1, 2]
    assert graph.num_pruned == 1


def test_min_node_prob_prunes_on_path_probability():
    graph = TokenGraph([0], merge_context=-1, max_nodes=UNLIMITED)
    (a,) = graph.expand([ROOT], [[1]], [[0.5]], 0.0, 0.0)
    # q = 0.3 alone passes 0.2, but the path probability 0.5 * 0.3 does not.
    created = graph.expand([a], [[2, 3]], [[0.6, 0.3]], sibling_ratio=0.0, min_node_prob=0.2)

    assert [graph.node(n).token for n in created] == [2]
    assert graph.node(created[0]).path_prob == pytest.approx(0.3)
    assert graph.num_pruned == 1


def test_node_budget_keeps_the_most_probable_candidates_of_the_level():
    graph = TokenGraph([0], merge_context=-1, max_nodes=5)
    a, b = graph.expand([ROOT], [[1, 2]], [[0.6, 0.4]], 0.0, 0.0)
    # Path probabilities: a->3 0.3, a->4 0.3, b->5 0.36, b->6 0.04; room for two.
    created = graph.expand([a, b], [[3, 4], [5, 6]], [[0.5, 0.5], [0.9, 0.1]], 0.0, 0.0)

    assert [graph.node(n).token for n in created] == [5, 3]
    assert graph.num_nodes == 5
    assert graph.num_over_budget == 2


def test_expanding_a_node_twice_is_rejected():
    graph = TokenGraph([0], merge_context=0, max_nodes=UNLIMITED)
    graph.expand([ROOT], [[1]], [[0.9]], 0.0, 0.0)
    with pytest.raises(ValueError, match="already expanded"):
        graph.expand([ROOT], [[2]], [[0.9]], 0.0, 0.0)


def test_repeated_candidate_tokens_are_rejected():
    graph = TokenGraph([0], merge_context=0, max_nodes=UNLIMITED)
    with pytest.raises(ValueError, match="distinct"):
        graph.expand([ROOT], [[1, 1]], [[0.5, 0.4]], 0.0, 0.0)


# Unroll


def test_unroll_repeats_a_merged_subtree_under_each_path():
    graph = TokenGraph([0], merge_context=0, max_nodes=UNLIMITED)
    a, b = graph.expand([ROOT], [[1, 2]], [[0.6, 0.4]], 0.0, 0.0)
    graph.expand([a, b], [[2], [3]], [[0.5], [0.5]], 0.0, 0.0)  # a -> b merged, b -> 3 created

    tree = graph.unroll(UNLIMITED, max_depth=3)

    assert sorted(tree_token_paths(tree)) == [(1,), (1, 2), (1, 2, 3), (2,), (2, 3)]
    assert tree.probs[tree_token_paths(tree).index((1, 2, 3))] == pytest.approx(0.6 * 0.5 * 0.5)


def test_unroll_flattens_most_probable_branch_first():
    graph = TokenGraph([0], merge_context=-1, max_nodes=UNLIMITED)
    a, b = graph.expand([ROOT], [[1, 2]], [[0.6, 0.4]], 0.0, 0.0)
    graph.expand([a, b], [[3, 4], [5]], [[0.3, 0.7], [0.9]], 0.0, 0.0)

    tree = graph.unroll(UNLIMITED, max_depth=2)

    assert tree.tokens == (1, 4, 3, 2, 5)
    assert tree.parents == (-1, 0, 0, -1, 3)
    assert tree.depths == (1, 2, 2, 1, 2)


def test_unroll_budget_keeps_the_most_probable_tree_nodes():
    graph = TokenGraph([0], merge_context=-1, max_nodes=UNLIMITED)
    a, b = graph.expand([ROOT], [[1, 2]], [[0.6, 0.4]], 0.0, 0.0)
    graph.expand([a, b], [[3, 4], [5]], [[0.3, 0.7], [0.9]], 0.0, 0.0)

    # Path probabilities: 1: .6, 2: .4, 1-4: .42, 1-3: .18, 2-5: .36
    assert sorted(tree_token_paths(graph.unroll(3, max_depth=2))) == [(1,), (1, 4), (2,)]
    assert tree_token_paths(graph.unroll(UNLIMITED, max_depth=1)) == [(1,), (2,)]


# FlatTree


def test_chain_is_a_linear_tree():
    tree = FlatTree.chain([7, 8, 9])

    assert tree.parents == (-1, 0, 1)
    assert tree.depths == (1, 2, 3)
    assert tree.branches() == [Branch(0, 2, ())]


def test_branches_of_a_hand_made_tree():
    #   root -> 0 -> 1 -> 2
    #                \-> 3 -> 4
    #        \-> 0 -> 7            (node 5 is 0's second child, 6 is root's second child)
    tree = FlatTree(
        tokens=(10, 11, 12, 13, 14, 15, 16, 17),
        parents=(-1, 0, 1, 1, 3, 0, -1, 6),
        depths=(1, 2, 3, 3, 4, 2, 1, 2),
        probs=(1.0,) * 8,
    )

    assert tree.branches() == [
        Branch(0, 2, ()),
        Branch(3, 4, (0, 1)),
        Branch(5, 5, (0,)),
        Branch(6, 7, ()),
    ]
    mask = tree.ancestor_mask()
    assert mask[4].nonzero()[0].tolist() == [0, 1, 3, 4]
    assert mask[7].nonzero()[0].tolist() == [6, 7]


def test_truncated_keeps_a_prefix():
    tree = FlatTree((1, 2, 3), (-1, 0, -1), (1, 2, 1), (0.5, 0.25, 0.5))

    assert tree.truncated(2) == FlatTree((1, 2), (-1, 0), (1, 2), (0.5, 0.25))
    assert len(tree.truncated(0)) == 0


@pytest.mark.parametrize(
    "parents, depths, tokens, message",
    [
        ((0,), (1,), (1,), "earlier node"),
        ((-1, 0), (1, 1), (1, 2), "depth"),
        ((-1, -1), (1, 1), (1, 1), "sibling"),
    ],
)
def test_flat_tree_rejects_malformed_trees(parents, depths, tokens, message):
    with pytest.raises(ValueError, match=message):
        FlatTree(tokens, parents, depths, (1.0,) * len(tokens))


# Properties over random drafts

graph_cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "vocab": st.integers(2, 5),
        "max_k": st.integers(1, 3),
        "levels": st.integers(1, 5),
        "tau": st.sampled_from([-1, 0, 1, 2]),
        "sibling_ratio": st.sampled_from([0.0, 0.3, 0.7]),
        "context": st.lists(st.integers(0, 4), min_size=1, max_size=3),
    }
)


def random_graph(case, max_nodes=UNLIMITED, min_node_prob=0.0) -> TokenGraph:
    context = [t % case["vocab"] for t in case["context"]]
    draft = random_draft(case["seed"], case["vocab"], case["max_k"], window=None)
    graph = TokenGraph(context, case["tau"], max_nodes)
    return grow(graph, context, draft, case["levels"], case["sibling_ratio"], min_node_prob)


@settings(max_examples=300, deadline=None)
@given(graph_cases)
def test_unbudgeted_tree_lists_every_dag_path_once(case):
    graph = random_graph(case)
    depth = case["levels"]

    tree = graph.unroll(UNLIMITED, max_depth=depth)

    assert is_acyclic(graph)
    assert sorted(tree_token_paths(tree)) == sorted(dag_token_paths(graph, depth))
    assert len(set(tree_token_paths(tree))) == len(tree)


@settings(max_examples=300, deadline=None)
@given(
    graph_cases,
    st.integers(2, 30),
    st.sampled_from([0.0, 0.01, 0.1]),
    st.integers(1, 40),
)
def test_budgeted_graph_and_tree_stay_valid(case, max_nodes, min_node_prob, max_tree_nodes):
    graph = random_graph(case, max_nodes, min_node_prob)
    full = graph.unroll(UNLIMITED, max_depth=case["levels"])

    tree = graph.unroll(max_tree_nodes, max_depth=case["levels"])

    assert is_acyclic(graph)
    assert graph.num_nodes <= max_nodes
    assert all(graph.node(n).path_prob >= min_node_prob for n in range(graph.num_nodes))
    assert set(tree_token_paths(tree)) <= set(dag_token_paths(graph, case["levels"]))
    # Best-first on probability: the kept nodes are the most probable ones.
    assert len(tree) == min(max_tree_nodes, len(full))
    assert sorted(tree.probs, reverse=True) == pytest.approx(sorted(full.probs, reverse=True)[: len(tree)])


@settings(max_examples=300, deadline=None)
@given(graph_cases, st.integers(1, 40))
def test_flat_tree_layout_invariants(case, max_tree_nodes):
    tree = random_graph(case).unroll(max_tree_nodes, max_depth=case["levels"])
    n = len(tree)
    children = [[j for j in range(n) if tree.parents[j] == i] for i in range(-1, n)]  # index i + 1

    # Parents before children, which is what makes every prefix ancestor-closed.
    assert all(parent < j for j, parent in enumerate(tree.parents))
    for kids in children:
        assert len({tree.tokens[j] for j in kids}) == len(kids)
        # Children are visited by descending path probability.
        assert [tree.probs[j] for j in kids] == sorted((tree.probs[j] for j in kids), reverse=True)
    for j, parent in enumerate(tree.parents):
        assert tree.probs[j] <= (tree.probs[parent] if parent >= 0 else 1.0)

    branches = tree.branches()
    if n:
        first = branches[0]
        assert first.start == 0 and first.ancestors == ()
        assert list(tree.depths[: first.end + 1]) == list(range(1, first.end + 2))
        assert children[first.end + 1] == []  # ends at a leaf
        for j in range(first.end + 1):  # and always took the most probable child
            siblings = children[tree.parents[j] + 1]
            assert tree.probs[j] == max(tree.probs[s] for s in siblings)

    # DFS preorder: each subtree occupies one contiguous range.
    mask = tree.ancestor_mask()
    for j in range(n):
        subtree = np.flatnonzero(mask[:, j])
        assert subtree.tolist() == list(range(j, j + len(subtree)))

    # Branches tile the flat order and rebuild the ancestor mask.
    assert [j for b in branches for j in range(b.start, b.end + 1)] == list(range(n))
    rebuilt = np.zeros((n, n), dtype=bool)
    for b in branches:
        assert all(tree.parents[j] == j - 1 for j in range(b.start + 1, b.end + 1))
        for j in range(b.start, b.end + 1):
            rebuilt[j, list(b.ancestors) + list(range(b.start, j + 1))] = True
            assert tree.depths[j] == len(b.ancestors) + j - b.start + 1
    assert (rebuilt == mask).all()

    for m in range(n + 1):
        prefix = tree.truncated(m)
        assert (prefix.tokens, prefix.parents, prefix.depths) == (tree.tokens[:m], tree.parents[:m], tree.depths[:m])
        assert (prefix.ancestor_mask() == mask[:m, :m]).all()

    # A token path names one node: siblings carry distinct tokens.
    for j, path in enumerate(tree_token_paths(tree)):
        node = -1
        for token in path:
            node = tree.child(node, token)
        assert node == j


def markov_graphs(case) -> tuple[TokenGraph, TokenGraph]:
    """The same order-(tau + 1) Markov draft grown with merging on (tau) and off."""
    tau = case["tau"]
    context = [t % case["vocab"] for t in case["context"]] + [0] * 2  # at least tau + 1 tokens
    draft = random_draft(case["seed"], case["vocab"], case["max_k"], window=tau + 1)
    merged, unmerged = (
        grow(TokenGraph(context, m, UNLIMITED), context, draft, case["levels"], case["sibling_ratio"])
        for m in (tau, -1)
    )
    return merged, unmerged


@settings(max_examples=300, deadline=None)
@given(graph_cases.map(lambda case: {**case, "tau": case["tau"] % 3}))
def test_merging_exact_markov_draft_keeps_the_verifiable_paths(case):
    merged, unmerged = markov_graphs(case)
    depth = case["levels"]

    merged_paths = tree_token_paths(merged.unroll(UNLIMITED, depth))
    unmerged_paths = tree_token_paths(unmerged.unroll(UNLIMITED, depth))

    assert sorted(merged_paths) == sorted(unmerged_paths)
    assert merged.num_nodes <= unmerged.num_nodes


def test_markov_draft_merges_save_draft_nodes():
    # Guards the property test above against passing vacuously.
    case = {"seed": 3, "vocab": 3, "max_k": 3, "levels": 4, "tau": 1, "sibling_ratio": 0.0, "context": [1, 2]}
    merged, unmerged = markov_graphs(case)

    assert merged.num_merged > 0
    assert merged.num_nodes < unmerged.num_nodes
    assert sorted(tree_token_paths(merged.unroll(UNLIMITED, 4))) == sorted(
        tree_token_paths(unmerged.unroll(UNLIMITED, 4))
    )
