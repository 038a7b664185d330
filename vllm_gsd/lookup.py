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
    tokens = np.asarray(tokens)
    length = len(tokens)
    # Earlier positions holding the last token, then how many tokens before
    # each also match (one vectorised comparison over the context, then a
    # few over the candidates: a step of a large batch runs one per request).
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    matched = np.ones(len(ends), dtype=np.int64)
    for back in range(1, min(max_ngram, length)):
        extends = (matched == back) & (ends >= back)
        extends[extends] = tokens[ends[extends] - back] == tokens[-1 - back]
        if not extends.any():
            break
        matched += extends
    longest = int(matched.max()) if len(ends) else 0
    if longest < min_ngram:
        return tokens[:0], 0
    # The latest of the longest matches.
    end = ends[len(matched) - 1 - int(np.argmax(matched[::-1]))]
    period = length - 1 - end
    extended = np.concatenate([tokens, np.empty(num_tokens, tokens.dtype)])
    for k in range(length, length + num_tokens):
        extended[k] = extended[k - period]
    return extended[length:], longest
