"""With the same draft and the same number of verified tokens per step, a GSD
tree accepts more per target pass than a single chain (GSD with top_k=1)."""

from __future__ import annotations

import pytest

from conftest import gsd_stats, running_llm
from prompts import prompt_token_ids

pytestmark = pytest.mark.slow

VERIFY_BUDGET = 6


def mean_accepted_length(target: str, draft: str, **shape) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with running_llm(target, {"method": "gsd", "model": draft,
                              "max_verify_nodes": VERIFY_BUDGET, "budget": "fixed",
                              **shape}) as llm:
        prompts = prompt_token_ids(llm.get_tokenizer())
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                     SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
        stats = gsd_stats(llm)
    assert stats["verified_nodes"] >= VERIFY_BUDGET * stats["verify_steps"] * 0.9
    return 1 + stats["accepted_tokens"] / stats["verify_steps"]


def test_tree_accepts_more_than_a_chain_at_the_same_verify_budget(target, weak_draft):
    chain = mean_accepted_length(target, weak_draft, top_k=1, max_depth=VERIFY_BUDGET,
                                 min_node_prob=0.0)
    tree = mean_accepted_length(target, weak_draft, top_k=4, max_depth=VERIFY_BUDGET,
                                sibling_ratio=0.0, min_node_prob=0.0)
    print(f"mean accepted length at {VERIFY_BUDGET} verified nodes: "
          f"chain {chain:.3f}, GSD tree {tree:.3f}")
    assert tree > chain
