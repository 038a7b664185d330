"""Tensor parallelism on CPU: two ranks (vLLM's mp executor, one core each)
verify one tree. The models are seeded random Llamas with 8 heads / 2 KV
heads (scripts/prepare_models.py); the draft is a perturbed copy of the
target, so trees are often accepted, and often off their first branch."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import running_llm

pytestmark = pytest.mark.slow

PROMPTS = ["The three primary colours are", "def fibonacci(n):",
           "List of fruits:\n1. apple\n2.", "Once upon a time",
           "Question: What is 12 plus 30?\nAnswer:", "Shopping list:\n- milk\n-"]
TP = dict(tensor_parallel_size=2, multiprocessing="1")


@pytest.fixture(autouse=True)
def one_core_per_rank(monkeypatch):
    # The automatic binding needs a NUMA node per rank (shared/models/README.md).
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")


@pytest.fixture(scope="module")
def tp_models(model_dir):
    return str(model_dir / "tp-test"), str(model_dir / "tp-test-draft")


def generate(llm) -> list[tuple[int, ...]]:
    from vllm import SamplingParams

    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24,
                                                   ignore_eos=True), use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


def all_ranks_stats(worker) -> dict:
    return {"rank": worker.rank, **worker.model_runner.drafter.stats.as_dict()}


def rank_1_drafts_chains(worker) -> None:
    """Makes rank 1's own drafts differ from rank 0's (chains, not trees)."""
    drafter = worker.model_runner.drafter
    if worker.rank == 1:
        drafter.config = dataclasses.replace(drafter.config, top_k=1)


@pytest.fixture(scope="module")
def plain_tp2(tp_models):
    """Plain decoding at TP=2. The binding is restored afterwards: later
    modules start TP=1 engines, whose mp executor refuses two core lists
    for one rank."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        with running_llm(tp_models[0], **TP) as llm:
            outputs = generate(llm)
    return outputs


def test_gsd_at_tp2_equals_plain_at_tp2_even_if_rank_1_would_draft_another_tree(
        tp_models, plain_tp2):
    target, draft = tp_models
    with running_llm(target, {"method": "gsd", "model": draft, "top_k": 4,
                              "sibling_ratio": 0.0, "max_verify_nodes": 8,
                              "budget": "fixed"}, **TP) as llm:
        llm.collective_rpc(rank_1_drafts_chains)
        outputs = generate(llm)
        stats = sorted(llm.collective_rpc(all_ranks_stats), key=lambda s: s["rank"])
    assert outputs == plain_tp2
    print("rank stats:", stats)
    rank_0, rank_1 = stats
    assert rank_0["off_first_branch_accepts"] > 0
    # Rank 1 drafted chains of its own, yet verified rank 0's trees.
    assert rank_1["tree_nodes"] < rank_0["tree_nodes"]
    assert rank_1["accepted_tokens"] == rank_0["accepted_tokens"]
    assert rank_1["off_first_branch_accepts"] == rank_0["off_first_branch_accepts"]
