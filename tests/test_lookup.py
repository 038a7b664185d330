"""Context lookup (vllm_gsd.lookup) and the path it adds to a tree."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_gsd.graph import FlatTree
from vllm_gsd.lookup import MATCH_LENGTH_BUCKETS, context_continuation, match_bucket


def continuation(tokens, min_ngram=2, max_ngram=4, num_tokens=3) -> list[int]:
    return context_continuation(np.array(tokens), min_ngram, max_ngram, num_tokens)[0].tolist()


def test_the_longest_matching_suffix_decides():
    # "2 3" last occurred before 8, but "1 2 3" (longer) before 7.
    assert continuation([1, 2, 3, 7, 5, 2, 3, 8, 6, 1, 2, 3]) == [7, 5, 2]


def test_the_latest_occurrence_of_the_suffix_decides():
    assert continuation([1, 2, 7, 9, 1, 2, 8, 9, 1, 2]) == [8, 9, 1]


def test_a_repetition_continues_with_its_period():
    assert continuation([4, 5, 5, 5, 5], num_tokens=4) == [5, 5, 5, 5]
    assert continuation([7, 1, 2, 8, 1, 2], num_tokens=5) == [8, 1, 2, 8, 1]


@pytest.mark.parametrize("tokens, min_ngram", [
    ([1, 2, 3, 4], 2),  # nothing repeats
    ([1, 2, 3, 1], 2),  # only a 1-token suffix repeats
    ([3], 1),  # no earlier token at all
])
def test_no_match_no_continuation(tokens, min_ngram):
    assert continuation(tokens, min_ngram=min_ngram) == []


def test_a_one_token_suffix_matches_when_allowed():
    assert continuation([1, 2, 3, 1], min_ngram=1) == [2, 3, 1]


def test_a_path_shares_the_trees_nodes_and_appends_the_rest():
    tree = FlatTree((5, 6, 7), (-1, 0, -1), (1, 2, 1), (0.5, 0.3, 0.2))
    with_path, path = tree.with_path([5, 6, 8, 9])
    assert path == [0, 1, 3, 4]
    assert with_path.tokens == (5, 6, 7, 8, 9)
    assert with_path.parents == (-1, 0, -1, 1, 3)
    assert with_path.depths == (1, 2, 1, 3, 4)
    assert with_path.probs[3:] == (0.0, 0.0)  # the draft did not propose them
    assert tree.with_path([7]) == (tree, [2])
    alone, path = FlatTree.chain(()).with_path([4, 4])
    assert (alone.tokens, alone.parents, path) == ((4, 4), (-1, 0), [0, 1])


def reference_continuation(tokens, min_ngram, max_ngram, num_tokens) -> tuple[list[int], int]:
    """The docstring's definition, by brute force: (continuation, match length)."""
    tokens = list(tokens)
    for n in range(max_ngram, min_ngram - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first
            if n < len(tokens) and tokens[start:start + n] == tokens[-n:]:
                period = len(tokens) - n - start
                out = tokens[:]
                for _ in range(num_tokens):
                    out.append(out[-period])
                return out[len(tokens):], n
    return [], 0


@pytest.mark.parametrize("dtype", [np.int32, np.int64])  # the engine's, NumPy's default
def test_matches_the_definition_on_random_text(dtype):
    rng = np.random.default_rng(0)
    for _ in range(500):
        # Tokens 0-3 and 256-259 share bytes: matches that straddle two tokens.
        tokens = (rng.integers(0, 4, int(rng.integers(1, 40)))
                  + 256 * rng.integers(0, 2)).astype(dtype)
        min_ngram = int(rng.integers(1, 4))
        max_ngram = int(rng.integers(min_ngram, 6))
        got, matched = context_continuation(tokens, min_ngram, max_ngram, 5)
        assert ((got.tolist(), matched)
                == reference_continuation(tokens.tolist(), min_ngram, max_ngram, 5)), tokens


def test_the_match_length_is_the_longest_matching_suffix_up_to_the_maximum():
    tokens = np.array([1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 5])
    assert context_continuation(tokens, 2, 16, 2)[1] == 5
    assert context_continuation(tokens, 2, 3, 2)[1] == 3


def test_match_lengths_fall_in_their_buckets():
    assert [match_bucket(n) for n in (1, 2, 3, 4, 7, 8, 15, 16, 40)] == [
        0, 0, 1, 2, 2, 3, 3, 4, 4]
    assert match_bucket(MATCH_LENGTH_BUCKETS[-1]) == len(MATCH_LENGTH_BUCKETS)
