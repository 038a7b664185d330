"""Tree acceptance: greedy walks, batching, and losslessness under sampling."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_gsd.graph import FlatTree
from vllm_gsd.verify import accept, choose_tokens

#   root -> 0:a -> 1:c -> 2:d
#        -> 3:b -> 4:e
#               -> 5:f
A, B, C, D, E, F, X, Y = 1, 2, 3, 4, 5, 6, 7, 8
TREE = FlatTree(
    tokens=(A, C, D, B, E, F),
    parents=(-1, 0, 1, -1, 3, 3),
    depths=(1, 2, 3, 1, 2, 2),
    probs=(0.6, 0.5, 0.4, 0.3, 0.2, 0.1),
)


def test_greedy_accepts_a_deep_path_off_the_first_branch():
    #         root  a  c  d  b  e  f
    chosen = [B, X, X, X, F, X, Y]

    assert accept(chosen, TREE) == ([3, 5], Y)


def test_greedy_rejects_at_the_root():
    chosen = [X, C, D, Y, E, Y, Y]

    assert accept(chosen, TREE) == ([], X)


def test_greedy_accepting_a_leaf_emits_its_bonus_token():
    chosen = [A, C, D, Y, X, X, X]

    assert accept(chosen, TREE) == ([0, 1, 2], Y)


def test_greedy_mismatch_mid_path_emits_the_correction():
    chosen = [A, X, D, Y, X, X, X]

    assert accept(chosen, TREE) == ([0], X)


def test_accept_needs_one_choice_per_row():
    with pytest.raises(ValueError, match="one chosen token per row"):
        accept([A, C], TREE)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=6), st.data())
def test_chain_acceptance_is_the_usual_longest_matching_prefix(draft, data):
    chosen = data.draw(st.lists(st.integers(0, 3), min_size=len(draft) + 1, max_size=len(draft) + 1))
    matched = 0
    while matched < len(draft) and draft[matched] == chosen[matched]:
        matched += 1

    assert accept(chosen, FlatTree.chain(draft)) == (list(range(matched)), chosen[matched])


def test_greedy_rows_take_the_argmax_even_when_others_sample():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    noise = torch.tensor([[1.0, 1e9, 1.0], [1e9, 1.0, 1.0], [1.0, 1.0, 1e9]])

    assert choose_tokens(logits, greedy=None, noise=None).tolist() == [1, 0, 2]
    # Huge noise on the argmax makes a sampled row pick something else.
    chosen = choose_tokens(logits, torch.tensor([True, False, False]), noise)
    assert chosen[0] == 1 and chosen[1] != 0 and chosen[2] != 2


def test_greedy_rows_break_ties_with_the_callers_argmax():
    """The engine passes plain decoding's own greedy kernel: where it breaks
    a tie differently from torch.argmax, the tree must follow it."""
    logits = torch.tensor([[5.0, 1.0, 5.0], [0.0, 7.0, 7.0]])

    def last_of_ties(rows: torch.Tensor) -> torch.Tensor:
        return rows.shape[-1] - 1 - rows.flip(-1).argmax(dim=-1)

    assert choose_tokens(logits, greedy=None, noise=None).tolist() == [0, 1]
    assert choose_tokens(logits, None, None, argmax=last_of_ties).tolist() == [2, 2]
    noise = torch.ones_like(logits)
    assert choose_tokens(logits, torch.tensor([True, False]), noise,
                         argmax=last_of_ties)[0] == 2


def sample_rows(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`choose_tokens` at temperature 1 with Exp(1) noise from `generator`."""
    noise = torch.empty_like(probs, dtype=torch.float32).exponential_(generator=generator)
    return choose_tokens(probs.log(), torch.zeros(len(probs), dtype=torch.bool), noise)


# Losslessness under sampling

VOCAB = 5


def target_distribution(seed: int) -> Callable[[tuple[int, ...]], np.ndarray]:
    """A synthetic target: a fixed random next-token distribution per prefix."""

    def probs(prefix: tuple[int, ...]) -> np.ndarray:
        return np.random.default_rng([seed, len(prefix), *prefix]).dirichlet(np.full(VOCAB, 0.7))

    return probs


def top_k_tree(target: Callable[[tuple[int, ...]], np.ndarray], k: int, depth: int) -> tuple[FlatTree, list[tuple]]:
    """The tree a perfect draft would propose: the target's top-k at every node.

    Returns the tree and each row's prefix (row 0 = the root, empty).
    """
    tokens, parents, depths, probs, prefixes = [], [], [], [], [()]

    def grow(parent: int, prefix: tuple[int, ...], prob: float) -> None:
        if len(prefix) == depth:
            return
        p = target(prefix)
        for token in np.argsort(-p)[:k].tolist():
            tokens.append(token)
            parents.append(parent)
            depths.append(len(prefix) + 1)
            probs.append(prob * float(p[token]))
            prefixes.append(prefix + (token,))
            grow(len(tokens) - 1, prefix + (token,), prob * float(p[token]))

    grow(-1, (), 1.0)
    return FlatTree(tuple(tokens), tuple(parents), tuple(depths), tuple(probs)), prefixes


def first_two_tokens(
    emitted: list[list[int]], target: Callable[[tuple[int, ...]], np.ndarray], generator: torch.Generator
) -> Counter:
    """Counts of (x1, x2); a step that emitted only x1 gets x2 from the next step's root row."""
    counts: Counter = Counter()
    for tokens in emitted:
        if len(tokens) == 1:
            row = torch.tensor(target((tokens[0],)))[None]
            tokens = tokens + sample_rows(row, generator).tolist()
        counts[tuple(tokens[:2])] += 1
    return counts


def total_variation(counts: Counter, target: Callable[[tuple[int, ...]], np.ndarray]) -> float:
    n = sum(counts.values())
    p1 = target(())
    exact = {(a, b): p1[a] * target((a,))[b] for a in range(VOCAB) for b in range(VOCAB)}
    return 0.5 * sum(abs(counts[pair] / n - p) for pair, p in exact.items())


NUM_SAMPLES = 20_000
# E[TV] <= 1/2 * sum_i sqrt(p_i / N) <= 1/2 * sqrt(K / N) = 0.018 for K = 25
# cells and N = 20000, and one sample moves TV by at most 1 / N, so by
# McDiarmid P(TV > E[TV] + t) <= exp(-2 N t^2) = 5e-6 for t = 0.0175. A
# correct sampler therefore stays below 0.035 for any seed.
TV_TOLERANCE = 0.035


@pytest.mark.parametrize("k, depth", [(2, 2), (2, 3), (3, 2)])
def test_sampled_tree_acceptance_emits_the_target_distribution(k, depth):
    target = target_distribution(seed=k * 10 + depth)
    tree, prefixes = top_k_tree(target, k, depth)
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor(np.stack([target(prefix) for prefix in prefixes]))

    chosen = sample_rows(rows.repeat(NUM_SAMPLES, 1), generator).view(NUM_SAMPLES, len(tree) + 1)
    emitted = []
    for choices in chosen.tolist():
        path, final = accept(choices, tree)
        emitted.append([tree.tokens[j] for j in path] + [final])

    assert np.mean([len(e) > 1 for e in emitted]) > 0.5  # the draft tree really was used
    assert total_variation(first_two_tokens(emitted, target, generator), target) < TV_TOLERANCE


def test_relaxed_min_p_over_q_acceptance_fails_the_same_check():
    # The reference code's "non-deterministic" mode: accept each child with
    # probability min(1, p / q), keep the first longest accepted path, sample
    # the bonus from the target, no residual. The same measurement must catch
    # it, or the test above proves nothing. Here the draft is perfect (q = p),
    # so every child is accepted and the rule always emits one fixed path.
    target = target_distribution(seed=22)
    tree, prefixes = top_k_tree(target, k=2, depth=2)
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    q = [tree.probs[j] / (tree.probs[parent] if parent >= 0 else 1.0) for j, parent in enumerate(tree.parents)]
    p = [target(prefixes[parent + 1])[token] for parent, token in zip(tree.parents, tree.tokens)]

    emitted = []
    for _ in range(NUM_SAMPLES):
        longest: list[int] = []
        stack: list[list[int]] = [[]]
        while stack:
            path = stack.pop()
            longest = max(longest, path, key=len)
            node = path[-1] if path else -1
            for j in range(len(tree)):
                if tree.parents[j] == node and rng.random() < min(1.0, p[j] / q[j]):
                    stack.append(path + [j])
        last_prefix = prefixes[longest[-1] + 1] if longest else ()
        bonus = rng.choice(VOCAB, p=target(last_prefix))
        emitted.append([tree.tokens[j] for j in longest] + [int(bonus)])

    assert total_variation(first_two_tokens(emitted, target, generator), target) > 3 * TV_TOLERANCE
