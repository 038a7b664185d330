"""Candidates from the request's own context (prompt lookup), for free.

A small target at temperature 0 often repeats text it has already seen or
written: code identifiers, a list's pattern, the passage it is asked to
summarise. Where the last few tokens occurred before, the tokens that
followed them then are a guess that costs no draft pass (vLLM's `ngram`
method drafts nothing else; on the CPU benchmark it accepted 52 % at depth
1). GSD adds that guess to a greedy request's tree as one more path from the
root, sharing the nodes the draft proposed too (`FlatTree.with_path`); the
budget prices its nodes with their own running acceptance.

Pure NumPy; imports nothing from vLLM.
"""

from __future__ import annotations

import numpy as np


MATCH_LENGTH_BUCKETS = (3, 4, 8, 16)
"""Lower bounds of the match lengths whose continuations are calibrated
apart (below 3, 3, 4-7, 8-15, 16 and more): the longer the suffix that
matched, the likelier its continuation is right. On the benchmark prompts'
greedy outputs (SmolLM2-135M), the first token after a 2-token match was
right 49 % of the time, after 3 tokens 63 %, after 4-7 74 %, after 8-15
90 % and after 16 or more 94 %; the eighth token 9 %, 16 %, 31 %, 36 % and
66 %. Calibrated as one, the long matches' paths were priced as the short
ones'."""


def match_bucket(match_length: int) -> int:
    """Index of the `MATCH_LENGTH_BUCKETS` range holding `match_length` (0:
    below the first bound)."""
    return sum(match_length >= bound for bound in MATCH_LENGTH_BUCKETS)


def context_continuation(tokens: np.ndarray, min_ngram: int, max_ngram: int,
                         num_tokens: int) -> tuple[np.ndarray, int]:
    """`num_tokens` tokens that continue `tokens` the way they continued
    after the latest earlier occurrence of their longest suffix of
    `min_ngram` to `max_ngram` tokens, and that suffix's length; empty and
    0 where no such suffix occurred before.

    The latest occurrence, not the earliest (vLLM's `ngram` takes the
    earliest): text that repeats tends to repeat its most recent form, such
    as the current iteration of a loop the model is in. An occurrence p
    tokens back says the text repeats with period p, so a continuation
    longer than p repeats itself (a model stuck on one token gets all
    `num_tokens` of it, not one).
    """
    tokens = np.ascontiguousarray(tokens)
    length = len(tokens)
    # Byte-string searches (C, with the engine's int32 tokens) over the
    # context but its last token, where every earlier occurrence ends: a
    # step of a large batch runs one search per request, and a loop of
    # NumPy calls per request cost 0.5 ms a step at batch 16 (cProfile).
    context = tokens[:-1].tobytes()

    def latest_start(n: int) -> int:
        """Index where the latest occurrence of the last n tokens starts
        in tokens[:-1], or -1."""
        pattern = tokens[length - n:].tobytes()
        end = len(context)
        while (at := context.rfind(pattern, 0, end)) > 0 and at % tokens.itemsize:
            end = at + len(pattern) - 1  # straddles two tokens: look earlier
        return at // tokens.itemsize if at >= 0 else -1

    # An occurrence of n tokens holds one of each shorter suffix, so the
    # longest suffix that occurred is found by bisection.
    shortest, longest = min_ngram, min(max_ngram, length - 1)
    start = latest_start(shortest) if shortest <= longest else -1
    if start < 0:
        return tokens[:0], 0
    while shortest < longest:  # `start` is the latest of `shortest` tokens
        middle = (shortest + longest + 1) // 2
        if (middle_start := latest_start(middle)) >= 0:
            shortest, start = middle, middle_start
        else:
            longest = middle - 1
    end = start + longest - 1
    # The tokens after that occurrence, repeated with its period.
    return np.resize(tokens[end + 1:], num_tokens), longest
