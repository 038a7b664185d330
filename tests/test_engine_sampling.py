"""Lossless sampling: at temperature > 0 GSD's outputs follow plain vLLM's
distribution. Many short generations per engine; the 2nd and 3rd generated
tokens (the first ones a tree verifies: the 1st comes from the prefill) are
compared between GSD and plain decoding with a chi-square test of
homogeneity.

Tolerance: the test rejects at p < 1e-3. Both samples are drawn with a fixed
engine seed, so the outcome is deterministic; a correct sampler fails it with
probability 1e-3 over seeds. The lossy acceptance rules this guards against
move the distribution by a total variation of 0.4 to 0.9 (shared/models/
README.md, tests/test_verify.py), which these sample sizes detect with
p-values far below 1e-10.
"""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import gsd_stats, running_llm

pytestmark = pytest.mark.slow

NUM_SAMPLES = 1200
PROMPT = "Write one sentence about the sea:"
# Short contexts: all 64 requests fit the KV cache at once.
ENGINE = dict(max_model_len=128, max_num_seqs=64)
SETTINGS = {
    "temperature_1": dict(temperature=1.0),
    "temperature_0.8_top_k_top_p": dict(temperature=0.8, top_k=40, top_p=0.9),
}


def sample(llm, params: dict) -> list[tuple[int, ...]]:
    from vllm import SamplingParams

    outputs = llm.generate([PROMPT] * NUM_SAMPLES,
                           SamplingParams(max_tokens=3, ignore_eos=True, **params),
                           use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


def homogeneity_p_value(a: list, b: list, min_count: int = 10) -> float:
    """Chi-square test that two samples come from one distribution; rare
    categories are pooled so every expected count stays large."""
    from scipy.stats import chi2_contingency

    counts_a, counts_b = Counter(a), Counter(b)
    common = [k for k in counts_a | counts_b
              if counts_a[k] + counts_b[k] >= min_count]
    rows = [[counts_a[k] for k in common], [counts_b[k] for k in common]]
    rows[0].append(len(a) - sum(rows[0]))
    rows[1].append(len(b) - sum(rows[1]))
    if rows[0][-1] + rows[1][-1] == 0:
        rows = [r[:-1] for r in rows]
    return chi2_contingency(rows).pvalue


@pytest.fixture(scope="module")
def plain_samples(target):
    with running_llm(target, **ENGINE) as llm:
        samples = {name: sample(llm, params) for name, params in SETTINGS.items()}
    return samples


@pytest.fixture(scope="module")
def gsd_samples(target, distilled_draft):
    # The distilled draft, not the target itself: a draft's quality moves only
    # how often a tree row is accepted, never which distribution a row samples
    # from, and with the target as its own draft the two fixtures took 384 s
    # on a 2-core AVX2 CPU (215 s with this draft).
    with running_llm(target, {"method": "gsd", "model": distilled_draft, "top_k": 3,
                              "sibling_ratio": 0.0, "max_verify_nodes": 6,
                              "max_depth": 2, "budget": "fixed"}, **ENGINE) as llm:
        samples = {name: sample(llm, params) for name, params in SETTINGS.items()}
        stats = gsd_stats(llm)
    return samples, stats


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_tokens_follow_the_plain_distribution(name, plain_samples, gsd_samples):
    gsd, stats = gsd_samples
    plain = plain_samples[name]
    for label, pick in [("2nd token", lambda s: s[1]), ("3rd token", lambda s: s[2]),
                        ("2nd and 3rd", lambda s: s[1:3])]:
        p = homogeneity_p_value([pick(s) for s in gsd[name]], [pick(s) for s in plain])
        print(f"{name}, {label}: p = {p:.4f}")
        assert p > 1e-3, f"{name}, {label}: GSD differs from plain (p = {p:.2e})"
    # The trees really were used, off their first branch too.
    assert stats["accepted_tokens"] > NUM_SAMPLES
    assert stats["off_first_branch_accepts"] > 0
