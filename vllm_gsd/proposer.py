"""GSDProposer: grows each request's token graph with the draft model.

vLLM builds it through the `custom_class` proposer hook (the plugin points
`speculative_config.model` here) and calls `propose` after every step's
bookkeeping (vllm/v1/worker/gpu_model_runner.py, `propose_draft_token_ids`).
It returns the flattened tree's tokens as the request's draft tokens, parents
first, and keeps the tree itself in `trees` for the next step's target pass
(`vllm_gsd.step.TreeStep` takes it from there).

The draft's K/V of accepted tokens live in vLLM's KV cache, in pages of the
request's own blocks (`vllm_gsd.draft_model.DraftKVCache`; patches.py P9
adds the draft's layers to vLLM's KV cache spec), so vLLM sizes, frees and
preempts them with the target's; a step's tree nodes live in scratch rows.

One draft step for all requests together:
  1. catch-up: the tokens accepted since the request's draft K/V were last
     written (at least the root, the token sampled last) run causally; the
     root's logits give the first level's candidates;
  2. one draft forward per further level over every request's frontier, each
     node attending to the prefix and its own creation ancestors at position
     root + depth; candidates merge into the graph (`TokenGraph.expand`);
  3. the graph unrolls into the verify tree (`TokenGraph.unroll`); a greedy
     request's tree also gets the path its own context suggests
     (`vllm_gsd.lookup`), drafted or not. The adaptive budget
     (`vllm_gsd.budget`) keeps the nodes worth verifying on this hardware
     at this batch size, possibly none. The budget also sets how many
     levels the next steps draft: the depth whose trees have paid best for
     their draft passes, or none while no depth pays (the lookup paths are
     still offered then, while they pay for their search).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm.logger import init_logger

from vllm_gsd.budget import (BudgetRequest, GraphBudget, StepCostModel,
                             StepShape)
from vllm_gsd.config import GSDConfig
from vllm_gsd.draft_model import SINK, DenseKernels, DraftKVCache, TreeDraftModel
from vllm_gsd.graph import ROOT, FlatTree, TokenGraph
from vllm_gsd.lookup import context_continuation, match_bucket
from vllm_gsd.metrics import GSDStats
from vllm_gsd.patches import vllm_cpu_kernels

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.sampling_params import SamplingParams

# Under "vllm." so vLLM's logging configuration (handlers, level) applies.
logger = init_logger(f"vllm.{__name__}")

# Catch-ups run batched, each padded to its group's longest: a request joins
# a group while that at most doubles its rows or adds at most this many, so
# the steady state's 1-4 tokens and the hundreds after a pause in drafting
# (up to MAX_PROBE_INTERVAL steps) or of a new prompt pad little.
_CATCH_UP_PAD_SLACK = 8
# vLLM's threshold for "temperature means greedy" (vllm/v1/sample/sampler.py).
_SAMPLING_EPS = 1e-5


DRAFT_LAYER_PREFIX = "gsd_draft.layers."
"""Names of the draft's layers in vLLM's KV cache spec and config."""


@dataclass
class _Drafting:
    """One request's state while its graph grows during one step."""

    req_id: str
    tokens: np.ndarray  # [num_tokens] accepted tokens, the root last
    graph: TokenGraph
    max_verify: int
    greedy: bool
    pinned: bool
    """Seeded sampling: always drafted, whole tree (`vllm_gsd.budget`)."""
    num_cached: int
    """Leading tokens whose draft K/V are in the paged cache already."""
    paged_slots: np.ndarray
    """Slot of each token position the request's blocks hold so far; tokens
    past them (the root, when its block comes with the next schedule) get
    scratch rows instead."""
    frontier: list[int] = field(default_factory=list)
    scratch_rows: list[int] = field(default_factory=list)
    """Scratch rows holding this step's K/V: accepted tokens past the
    request's blocks first, then the nodes fed to the draft."""
    scratch_column: dict[int, int] = field(default_factory=dict)
    """Index in `scratch_rows` of each node fed to the draft."""
    first_row: int = SINK
    """Start of the request's range of scratch rows this step."""

    @property
    def root_position(self) -> int:
        return len(self.tokens) - 1

    @property
    def paged_len(self) -> int:
        """Accepted tokens whose K/V are paged once the catch-up ran."""
        return min(len(self.tokens), len(self.paged_slots))

    @property
    def num_unpaged(self) -> int:
        return len(self.tokens) - self.paged_len

    @property
    def num_uncached(self) -> int:
        """Accepted tokens the catch-up feeds (their draft K/V are not computed)."""
        return len(self.tokens) - self.num_cached


def plain_decoding_reason(params: SamplingParams) -> str | None:
    """Why a request must be decoded without a tree, or None.

    These options make the target's distribution at a node depend on the
    chain of tokens before it in ways vLLM's spec-decode path computes for a
    chain only, or (min_p, logit_bias) vLLM's spec-decode path does not
    apply at all; with no drafts the request takes vLLM's plain sampler,
    which applies them exactly (patches.py P8 builds their processors).
    """
    if params.logit_bias:
        return "logit_bias"
    # min_p never changes the argmax: greedy requests keep their trees.
    if params.min_p and params.temperature >= _SAMPLING_EPS:
        return "min_p"
    if params.structured_outputs is not None:
        return "structured output"
    if (params.presence_penalty or params.frequency_penalty
            or params.repetition_penalty != 1.0):
        return "penalties"
    if params.bad_words:
        return "bad_words"
    if params.min_tokens:
        return "min_tokens"
    if params.allowed_token_ids:
        return "allowed_token_ids"
    return None


class GSDProposer:
    """The `custom_class` proposer vLLM instantiates with the VllmConfig."""

    def __init__(self, vllm_config: VllmConfig):
        spec = vllm_config.speculative_config
        self.config: GSDConfig = spec.gsd  # attached by vllm_gsd.patches
        self.max_model_len = vllm_config.model_config.max_model_len
        self.dtype = vllm_config.model_config.dtype
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self.trees: dict[str, FlatTree] = {}
        self.stats = GSDStats()
        self.runner: Any = None  # the GPUModelRunner, bound by vllm_gsd.patches
        self.draft: TreeDraftModel | None = None
        self.kv: DraftKVCache | None = None
        self._num_cached: dict[str, int] = {}
        """Per request of the last step's batch: leading tokens whose draft
        K/V are paged. A request missing from a step's batch (preempted, so
        its blocks may have been reused) starts again from none."""
        self._step = 0
        self._plain_reasons_logged: set[str] = set()
        self.budget = (GraphBudget(self.config.max_depth,
                                   lookup_depth=self.config.lookup_tokens)
                       if self.config.budget == "adaptive" else None)
        self._verifying: dict[str, BudgetRequest] = {}
        """This step's trees as offered to the budget, for its calibration."""
        self._timing = _StepTiming()

    def load_model(self, target_model: torch.nn.Module) -> None:
        device = next(target_model.parameters()).device
        kernels = vllm_cpu_kernels() if device.type == "cpu" else DenseKernels()
        self.draft = TreeDraftModel(self.config.model, self.dtype, device,
                                    self.config.draft_vocab_size, kernels)
        logger.info("GSD draft model %s loaded: %d layers", self.config.model,
                    self.draft.num_layers)

    @property
    def kv_cache_layer_names(self) -> list[str]:
        return [f"{DRAFT_LAYER_PREFIX}{i}" for i in range(self.draft.num_layers)]

    def bind_kv_cache(self, pages: list[torch.Tensor], block_size: int) -> None:
        """The draft's pages in vLLM's KV cache, one per layer (patches.py P9).
        The scratch area starts with its SINK row and grows with the batch."""
        self.kv = DraftKVCache(pages, block_size, self.draft.new_scratch(1))
        self._num_cached = {}

    def propose(self, sampled_token_ids: list[list[int]],
                num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray,
                slot_mappings: Any = None) -> list[list[int]]:
        """Drafts a tree per request; returns its flattened tokens per row."""
        start = time.perf_counter()
        self._step += 1
        # Trees live for one step: a request left out of the next step is
        # verified later as a chain of its drafts (still exact).
        self.trees = {}
        self._verifying = {}
        # Rows without a sampled token are prefill chunks or discarded.
        num_decoding = sum(1 for sampled in sampled_token_ids if sampled)
        levels = (self.config.max_depth if self.budget is None
                  else self.budget.next_step(num_decoding))
        looks_up = self.budget is None or self.budget.looks_up
        req_ids = self.runner.input_batch.req_ids
        self._num_cached = {r: self._num_cached[r] for r in req_ids if r in self._num_cached}
        drafting: list[_Drafting] = []
        # Greedy requests the step does not draft, with their lookup paths.
        undrafted: list[tuple[str, BudgetRequest]] = []
        for row, sampled in enumerate(sampled_token_ids):
            if not sampled:
                continue
            req_id = req_ids[row]
            params = self._tree_sampling_params(req_id)
            if params is None:
                continue
            greedy = params.temperature < _SAMPLING_EPS
            pinned = not greedy and params.seed is not None
            num_tokens = int(num_tokens_no_spec[row])
            max_verify = min(self.config.max_verify_nodes,
                             self.max_model_len - num_tokens - 1)
            if max_verify <= 0:
                continue
            tokens = token_ids_cpu[row, :num_tokens]
            if not (levels or pinned):
                self.stats.undrafted_by_budget += 1
                if looks_up:
                    offer = self._offer(None, tokens, max_verify, greedy, pinned)
                    if len(offer.tree):
                        undrafted.append((req_id, offer))
                continue
            graph = TokenGraph(tokens[-max(self.config.merge_context, 0) - 1:],
                               self.config.merge_context,
                               self.config.max_draft_nodes + 1)
            drafting.append(_Drafting(req_id, tokens, graph, max_verify, greedy, pinned,
                                      self._num_cached.get(req_id, 0),
                                      self._paged_slots(req_id)))
        unpinned_in_batch = sum(not d.pinned for d in drafting)
        drafting = self._limit_unpinned(drafting)
        longest_catch_up = 0
        level_ms = []
        if drafting:
            self.stats.draft_steps += 1
            next_row = 1  # SINK stays free
            for d in drafting:
                d.first_row = next_row
                d.scratch_rows = list(range(next_row, next_row + d.num_unpaged))
                next_row += d.num_unpaged + self.config.max_draft_nodes
            self.kv.ensure_scratch_rows(next_row)
            longest_catch_up = self._catch_up(drafting)
            for level in range(1, self.config.max_depth):
                # Pinned trees are whole whatever the budget's depth.
                growing = [d for d in drafting
                           if d.frontier and (level < levels or d.pinned)]
                if not growing:
                    break
                level_start = time.perf_counter()
                self._grow_level(growing)
                level_ms.append((time.perf_counter() - level_start) * 1e3)
        for d in drafting:
            self.stats.observe_graph(d.graph)
        # Undrafted requests are offered their lookup paths only in a step
        # that drafts no unpinned request, never beside a sampled probe
        # (`GraphBudget.drafted_sample`), whose trees stand for the batch.
        offers = [(d.req_id, self._offer(d.graph, d.tokens, d.max_verify, d.greedy, d.pinned))
                  for d in drafting] + undrafted
        # A search that found nothing is measured too: it cost its time.
        if self.budget is not None and (offers or looks_up):
            choice = self.budget.choose([offer for _, offer in offers], num_decoding,
                                        unpinned_in_batch)
            for (_, offer), kept in zip(offers, choice.kept):
                self.stats.budget_cut_nodes += len(offer.tree) - len(kept)
                offer.cut(kept)
        for req_id, offer in offers:
            self.stats.observe_tree(offer.tree, len(offer.lookup))
            if len(offer.tree):
                self.trees[req_id] = offer.tree
                self._verifying[req_id] = offer
        total_ms = (time.perf_counter() - start) * 1e3
        if self.budget is not None:
            # What drafting costs includes its trees' lookup search, offers
            # and choice, as the undrafted steps' search is charged to them.
            if drafting:
                self.budget.observe_draft(len(drafting), [total_ms - sum(level_ms), *level_ms],
                                          longest_catch_up)
            elif looks_up:
                self.budget.observe_lookup(total_ms)
        self._timing.draft_ms += total_ms
        return [list(self.trees[r].tokens) if r in self.trees else []
                for r in req_ids[:len(sampled_token_ids)]]

    def observe_acceptance(self, batch_index: int, verified: FlatTree,
                           path: list[int]) -> None:
        """The verifier's result for one request: the tree it verified (this
        step's tree, possibly cut by the scheduler, or another rank's) and
        the flat indices of the accepted path."""
        self.stats.observe_acceptance(len(verified), path)
        offer = self._verifying.get(self.runner.input_batch.req_ids[batch_index])
        if (offer is not None and len(verified)
                and verified.tokens == offer.tree.tokens[:len(verified)]
                and verified.parents == offer.tree.parents[:len(verified)]):
            self.stats.lookup_accepted_tokens += sum(j in offer.lookup for j in path)
            if self.budget is not None:
                self.budget.observe_acceptance(offer, len(verified), path)

    def target_step_started(self, shape: StepShape | None) -> None:
        """shape None: the step is not measured (it has prompt tokens)."""
        if self.budget is not None:
            self._timing.start(shape, self.budget.costs)
            if shape is None:
                self.budget.break_sequence()

    def target_step_finished(self) -> None:
        if self.budget is not None:
            self._timing.finish(self.budget.costs)

    def _offer(self, graph: TokenGraph | None, tokens: np.ndarray, max_verify: int,
               greedy: bool, pinned: bool) -> BudgetRequest:
        """The request's tree for the budget: the graph unrolled (None: not
        drafted) and, for a greedy request, its context-lookup path added
        (`vllm_gsd.lookup`; its new nodes are kept room for)."""
        path, matched = (context_continuation(tokens, self.config.prompt_lookup_min,
                                              self.config.prompt_lookup_max,
                                              min(self.config.lookup_tokens, max_verify))
                         if greedy and self.config.lookup_tokens else ((), 0))
        tree = (FlatTree.chain(()) if graph is None
                else graph.unroll(max_verify - len(path), self.config.max_depth))
        tree, lookup = tree.with_path(path)
        return BudgetRequest(tree, greedy, pinned, frozenset(lookup), match_bucket(matched))

    def _tree_sampling_params(self, req_id: str) -> SamplingParams | None:
        """The request's sampling params, or None when it must be decoded
        without a tree."""
        state = self.runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        if params is None:
            return None
        reason = plain_decoding_reason(params)
        if reason is None:
            return params
        self.stats.plain_fallbacks += 1
        if reason not in self._plain_reasons_logged:
            self._plain_reasons_logged.add(reason)
            logger.info("GSD: requests with %s are decoded without a tree "
                        "(exact plain sampling); logged once per reason.", reason)
        return None

    def _limit_unpinned(self, drafting: list[_Drafting]) -> list[_Drafting]:
        """Those of `drafting` this step drafts: every pinned request, and
        the unpinned ones the budget samples (`GraphBudget.drafted_sample`)."""
        unpinned = [d for d in drafting if not d.pinned]
        sample = None if self.budget is None else self.budget.drafted_sample(len(unpinned))
        if sample is None:
            return drafting
        self.stats.undrafted_by_budget += len(unpinned) - len(sample)
        drafted = {id(unpinned[i]) for i in sample}
        return [d for d in drafting if d.pinned or id(d) in drafted]

    def _paged_slots(self, req_id: str) -> np.ndarray:
        """Slot of every position the request's blocks hold (one KV cache
        group: patches.py P9 refuses targets with more)."""
        block_ids = np.asarray(self.runner.requests[req_id].block_ids[0])
        size = self.kv.block_size
        return (block_ids[:, None] * size + np.arange(size)).ravel()

    def _catch_up(self, drafting: list[_Drafting]) -> int:
        """Feeds each request's uncached accepted tokens; expands the roots.
        Returns the most tokens one request fed."""
        for d in drafting:
            # A request whose tokens shrank (should not happen) restarts.
            if d.num_cached >= len(d.tokens):
                d.num_cached = 0
        groups: list[list[_Drafting]] = []  # each longest first
        for d in sorted(drafting, key=lambda d: -d.num_uncached):
            n = d.num_uncached
            if groups and groups[-1][0].num_uncached <= max(2 * n, n + _CATCH_UP_PAD_SLACK):
                groups[-1].append(d)
            else:
                groups.append([d])
        for group in groups:
            batch = _DraftBatch(group, [d.num_uncached for d in group])
            for b, d in enumerate(group):
                positions = np.arange(d.num_cached, len(d.tokens))
                n, paged = len(positions), d.paged_len
                batch.tokens[b, :n] = d.tokens[positions]
                batch.positions[b, :n] = positions
                in_pages = positions < paged
                batch.write_slots[b, :n][in_pages] = d.paged_slots[positions[in_pages]]
                batch.write_rows[b, :n][~in_pages] = d.scratch_rows
                batch.attend[b, :n, :paged] = np.arange(paged) <= positions[:, None]
                unpaged = np.arange(paged, len(d.tokens))
                batch.attend[b][:n, batch.num_paged + np.arange(len(unpaged))] = (
                    unpaged <= positions[:, None])
            roots = np.array([d.num_uncached - 1 for d in group])
            top_tokens, top_probs = self._candidates(self._forward(batch, roots))
            for b, d in enumerate(group):
                self._num_cached[d.req_id] = d.paged_len
                d.frontier = d.graph.expand([ROOT], top_tokens[b], top_probs[b],
                                            self.config.sibling_ratio,
                                            self.config.min_node_prob)
        return max(d.num_uncached for d in drafting)

    def _grow_level(self, growing: list[_Drafting]) -> None:
        """One draft forward over every request's frontier nodes."""
        for d in growing:
            for node in d.frontier:
                d.scratch_column[node] = len(d.scratch_rows)
                d.scratch_rows.append(d.first_row + len(d.scratch_rows))
        batch = _DraftBatch(growing, [len(d.frontier) for d in growing])
        for b, d in enumerate(growing):
            n = len(d.frontier)
            batch.attend[b, :n, :d.paged_len] = True
            batch.attend[b, :n, batch.num_paged:batch.num_paged + d.num_unpaged] = True
            for q, node in enumerate(d.frontier):
                path = d.graph.creation_path(node)
                batch.tokens[b, q] = d.graph.node(node).token
                batch.positions[b, q] = d.root_position + len(path) - 1
                batch.write_rows[b, q] = d.scratch_rows[d.scratch_column[node]]
                batch.attend[b, q, [batch.num_paged + d.scratch_column[a]
                                    for a in path if a != ROOT]] = True
        top_tokens, top_probs = self._candidates(self._forward(batch))
        for b, d in enumerate(growing):
            n = len(d.frontier)
            d.frontier = d.graph.expand(d.frontier, top_tokens[b][:n], top_probs[b][:n],
                                        self.config.sibling_ratio,
                                        self.config.min_node_prob)

    def _forward(self, batch: _DraftBatch, logits_at: np.ndarray | None = None
                 ) -> torch.Tensor:
        device = self.draft.device
        self.stats.draft_forward_passes += 1
        self.stats.draft_tokens += batch.num_queries
        arrays = (batch.tokens, batch.positions, batch.write_slots, batch.write_rows,
                  batch.read_slots, batch.read_rows, batch.attend)
        if logits_at is not None:
            arrays += (logits_at,)
        return self.draft.forward(self.kv, *(torch.from_numpy(a).to(device) for a in arrays))

    def _candidates(self, logits: torch.Tensor) -> tuple[list, list]:
        """Top-k token ids and draft probabilities of every query, as nested
        lists [B][Q][top_k]; one softmax and top-k for the whole batch."""
        probs = torch.softmax(logits.float(), dim=-1)
        top_probs, top_columns = probs.topk(self.config.top_k, dim=-1)
        head = self.draft.head_token_ids
        top_tokens = top_columns if head is None else head[top_columns]
        return top_tokens.tolist(), top_probs.tolist()


KEY_COLUMNS_STEP = 64
"""A draft forward's key columns come in multiples of this. PyTorch's bf16
batched matmul on CPU (the draft's attention for a few queries) builds a
oneDNN kernel for every new shape, about 0.4 ms each, and a context one
token longer is a new shape: in a batch of 4, 2.7 ms of a 5 ms draft pass
went to those kernels."""


class _DraftBatch:
    """The inputs of one draft forward (`TreeDraftModel.forward`) for the
    requests `group`, with `num_queries[b]` queries in row b, padded with
    SINK. The key columns are each request's paged tokens, then its scratch
    rows; the callers fill in the queries and the attend mask."""

    def __init__(self, group: list[_Drafting], num_queries: list[int]):
        rows = len(group)
        self.num_queries = sum(num_queries)
        self.tokens = np.zeros((rows, max(num_queries)), dtype=np.int64)
        self.positions = np.zeros_like(self.tokens)
        self.write_slots = np.full_like(self.tokens, SINK)
        self.write_rows = np.full_like(self.tokens, SINK)
        scratch_width = max(len(d.scratch_rows) for d in group)
        # Key columns in whole multiples of KEY_COLUMNS_STEP (padding: SINK,
        # never attended).
        self.num_paged = -(-(max(d.paged_len for d in group) + scratch_width)
                           // KEY_COLUMNS_STEP) * KEY_COLUMNS_STEP - scratch_width
        self.read_slots = np.full((rows, self.num_paged), SINK, dtype=np.int64)
        self.read_rows = np.full((rows, scratch_width), SINK, dtype=np.int64)
        for b, d in enumerate(group):
            self.read_slots[b, :d.paged_len] = d.paged_slots[:d.paged_len]
            self.read_rows[b, :len(d.scratch_rows)] = d.scratch_rows
        self.attend = np.zeros(self.tokens.shape + (self.num_paged + self.read_rows.shape[1],),
                               dtype=bool)
        self.attend[:, :, 0] = True  # padded queries need one key, or SDPA gives NaN


@dataclass
class _StepTiming:
    """Wall-clock measurement of target steps for the budget's cost model:
    from input preparation to the end of sampling, less the proposer's own
    time (measured as draft time), and the gap to the next step."""

    draft_ms: float = 0.0
    _shape: StepShape | None = None
    _started: float = 0.0
    _ended: float | None = None
    _last_step_ms: float = 0.0

    def start(self, shape: StepShape | None, costs: StepCostModel) -> None:
        now = time.perf_counter()
        if self._ended is not None:
            gap_ms = (now - self._ended) * 1e3
            # A longer gap is the engine idling between requests, not overhead.
            if gap_ms <= self._last_step_ms:
                costs.observe_gap(gap_ms)
        self._shape, self._started, self.draft_ms = shape, now, 0.0

    def finish(self, costs: StepCostModel) -> None:
        if self._shape is None:  # an unmeasured step: no gap after it either
            self._ended = None  # (the budget broke the sequence at its start)
            return
        now = time.perf_counter()
        self._last_step_ms = (now - self._started) * 1e3
        costs.observe_target(self._shape, self._last_step_ms - self.draft_ms)
        self._shape, self._ended = None, now
