"""GSDProposer: grows each request's token graph with the draft model.

vLLM builds it through the `custom_class` proposer hook (the plugin points
`speculative_config.model` here) and calls `propose` after every step's
bookkeeping (vllm/v1/worker/gpu_model_runner.py, `propose_draft_token_ids`).
It returns the flattened tree's tokens as the request's draft tokens, parents
first, and keeps the tree itself in `trees` for the next step's target pass
(`vllm_gsd.step.TreeStep` takes it from there).

One draft step for all requests together:
  1. catch-up: the tokens accepted since the request's draft cache was last
     valid (at least the root, the token sampled last) run causally; the
     root's logits give the first level's candidates;
  2. one draft forward per further level over every request's frontier, each
     node attending to the prefix and its own creation ancestors at position
     root + depth; candidates merge into the graph (`TokenGraph.expand`);
  3. the graph unrolls into the verify tree (`TokenGraph.unroll`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm.logger import init_logger

from vllm_gsd.config import GSDConfig
from vllm_gsd.draft_model import TreeDraftModel
from vllm_gsd.graph import ROOT, FlatTree, TokenGraph
from vllm_gsd.metrics import GSDStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.sampling_params import SamplingParams

# Under "vllm." so vLLM's logging configuration (handlers, level) applies.
logger = init_logger(f"vllm.{__name__}")

# Catch-ups longer than this (a new prompt) run alone instead of padding the
# whole batch to their length.
_BATCHED_CATCH_UP_LEN = 16


@dataclass
class _Slot:
    """A request's rows in the draft cache."""

    index: int
    num_cached: int = 0
    """Leading tokens of the request whose draft K/V are valid in the cache."""
    last_used: int = 0


@dataclass
class _Drafting:
    """One request's state while its graph grows during one step."""

    req_id: str
    slot: _Slot
    tokens: np.ndarray  # [num_tokens] accepted tokens, the root last
    graph: TokenGraph
    max_verify: int
    frontier: list[int] = field(default_factory=list)
    column: dict[int, int] = field(default_factory=dict)
    """Draft cache column of each node fed to the draft this step."""

    @property
    def root_position(self) -> int:
        return len(self.tokens) - 1


def plain_decoding_reason(params: SamplingParams) -> str | None:
    """Why a request must be decoded without a tree, or None.

    These options make the target's distribution at a node depend on the
    chain of tokens before it in ways vLLM's spec-decode path computes for a
    chain only; with no drafts the request takes vLLM's plain sampler, which
    applies them exactly. (min_p and logit_bias never get here: vLLM rejects
    them under speculative decoding.)
    """
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
        self._slots: dict[str, _Slot] = {}
        self._step = 0
        self._plain_reasons_logged: set[str] = set()

    def load_model(self, target_model: torch.nn.Module) -> None:
        device = next(target_model.parameters()).device
        # A slot holds a whole request plus the nodes drafted in one step.
        max_len = self.max_model_len + self.config.max_draft_nodes
        self.draft = TreeDraftModel(self.config.model, self.dtype, device,
                                    self.max_num_seqs, max_len,
                                    int(self.config.draft_cache_gib * 2**30),
                                    self.config.draft_vocab_size)
        self.num_slots = self.draft.num_slots
        logger.info("GSD draft model %s loaded: %d layers, KV cache for %d "
                    "requests of %d tokens", self.config.model,
                    self.draft.num_layers, self.num_slots, max_len)

    def propose(self, sampled_token_ids: list[list[int]],
                num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray,
                slot_mappings: Any = None) -> list[list[int]]:
        """Drafts a tree per request; returns its flattened tokens per row."""
        self._step += 1
        # Trees live for one step: a request left out of the next step is
        # verified later as a chain of its drafts (still exact).
        self.trees = {}
        req_ids = self.runner.input_batch.req_ids
        drafting = []
        for row, sampled in enumerate(sampled_token_ids):
            if not sampled:  # a prefill chunk or a discarded row
                continue
            req_id = req_ids[row]
            if self._needs_plain_decoding(req_id):
                continue
            num_tokens = int(num_tokens_no_spec[row])
            max_verify = min(self.config.max_verify_nodes,
                             self.max_model_len - num_tokens - 1)
            if max_verify <= 0:
                continue
            slot = self._slot_for(req_id, set(req_ids))
            if slot is None:
                continue
            tokens = token_ids_cpu[row, :num_tokens]
            graph = TokenGraph(tokens[-max(self.config.merge_context, 0) - 1:],
                               self.config.merge_context,
                               self.config.max_draft_nodes + 1)
            drafting.append(_Drafting(req_id, slot, tokens, graph, max_verify))
        if drafting:
            self.stats.draft_steps += 1
            self._catch_up(drafting)
            for _ in range(1, self.config.max_depth):
                growing = [d for d in drafting if d.frontier]
                if not growing:
                    break
                self._grow_level(growing)
        for d in drafting:
            tree = d.graph.unroll(d.max_verify, self.config.max_depth)
            self.stats.observe_graph(d.graph, tree)
            if len(tree):
                self.trees[d.req_id] = tree
        return [list(self.trees[r].tokens) if r in self.trees else []
                for r in req_ids[:len(sampled_token_ids)]]

    def _needs_plain_decoding(self, req_id: str) -> bool:
        state = self.runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        if params is None:
            return True
        reason = plain_decoding_reason(params)
        if reason is None:
            return False
        self.stats.plain_fallbacks += 1
        if reason not in self._plain_reasons_logged:
            self._plain_reasons_logged.add(reason)
            logger.info("GSD: requests with %s are decoded without a tree "
                        "(exact plain sampling); logged once per reason.", reason)
        return True

    def _slot_for(self, req_id: str, active: set[str]) -> _Slot | None:
        """The request's cache slot; evicts the least recently used idle one."""
        slot = self._slots.get(req_id)
        if slot is None:
            used = {s.index for s in self._slots.values()}
            free = [i for i in range(self.num_slots) if i not in used]
            if free:
                slot = _Slot(free[0])
            else:
                idle = [r for r in self._slots if r not in active]
                if not idle:
                    return None
                victim = min(idle, key=lambda r: self._slots[r].last_used)
                slot = _Slot(self._slots.pop(victim).index)
            self._slots[req_id] = slot
        slot.last_used = self._step
        return slot

    def _catch_up(self, drafting: list[_Drafting]) -> None:
        """Feeds each request's uncached accepted tokens; expands the roots."""
        for d in drafting:
            # A request whose tokens shrank (should not happen) restarts.
            if d.slot.num_cached >= len(d.tokens):
                d.slot.num_cached = 0
        short = [d for d in drafting
                 if len(d.tokens) - d.slot.num_cached <= _BATCHED_CATCH_UP_LEN]
        groups = [short] if short else []
        groups += [[d] for d in drafting if d not in short]
        for group in groups:
            queries = [list(range(d.slot.num_cached, len(d.tokens))) for d in group]
            tokens, positions, write, attend = self._padded_batch(
                len(group), max(len(q) for q in queries),
                max(len(d.tokens) for d in group))
            for b, (d, cols) in enumerate(zip(group, queries)):
                tokens[b, :len(cols)] = d.tokens[cols]
                positions[b, :len(cols)] = cols
                write[b, :len(cols)] = cols
                for q, col in enumerate(cols):
                    attend[b, q, :col + 1] = True
            last = torch.tensor([len(cols) - 1 for cols in queries])
            logits = self._forward(group, tokens, positions, write, attend)
            top_tokens, top_probs = self._candidates(
                logits[torch.arange(len(group)), last][:, None])
            for b, d in enumerate(group):
                d.slot.num_cached = len(d.tokens)
                d.column[ROOT] = d.root_position
                d.frontier = d.graph.expand([ROOT], top_tokens[b], top_probs[b],
                                            self.config.sibling_ratio,
                                            self.config.min_node_prob)

    def _grow_level(self, growing: list[_Drafting]) -> None:
        """One draft forward over every request's frontier nodes."""
        width = max(len(d.frontier) for d in growing)
        for d in growing:
            for node in d.frontier:
                d.column[node] = len(d.tokens) + len(d.column) - 1
        kv_len = max(max(d.column.values()) + 1 for d in growing)
        tokens, positions, write, attend = self._padded_batch(len(growing), width, kv_len)
        for b, d in enumerate(growing):
            attend[b, :len(d.frontier), :len(d.tokens)] = True
            for q, node in enumerate(d.frontier):
                path = d.graph.creation_path(node)
                tokens[b, q] = d.graph.node(node).token
                positions[b, q] = d.root_position + len(path) - 1
                write[b, q] = d.column[node]
                attend[b, q, [d.column[n] for n in path]] = True
        top_tokens, top_probs = self._candidates(
            self._forward(growing, tokens, positions, write, attend))
        for b, d in enumerate(growing):
            n = len(d.frontier)
            d.frontier = d.graph.expand(d.frontier, top_tokens[b][:n], top_probs[b][:n],
                                        self.config.sibling_ratio,
                                        self.config.min_node_prob)

    def _padded_batch(self, rows: int, width: int, kv_len: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Empty draft inputs: tokens, positions, write columns [rows, width]
        (padding writes to the sink) and the attend mask [rows, width, kv_len]."""
        tokens = np.zeros((rows, width), dtype=np.int64)
        write = np.full_like(tokens, self.draft.sink_index)
        attend = np.zeros((rows, width, kv_len), dtype=bool)
        attend[:, :, 0] = True  # padded queries need one key, or SDPA gives NaN
        return tokens, np.zeros_like(tokens), write, attend

    def _forward(self, group: list[_Drafting], tokens: np.ndarray,
                 positions: np.ndarray, write: np.ndarray,
                 attend: np.ndarray) -> torch.Tensor:
        device = self.draft.device
        self.stats.draft_forward_passes += 1
        self.stats.draft_tokens += int((write != self.draft.sink_index).sum())
        return self.draft.forward(
            torch.tensor([d.slot.index for d in group], device=device),
            torch.from_numpy(tokens).to(device),
            torch.from_numpy(positions).to(device),
            torch.from_numpy(write).to(device),
            torch.from_numpy(attend).to(device))

    def _candidates(self, logits: torch.Tensor) -> tuple[list, list]:
        """Top-k token ids and draft probabilities of every query, as nested
        lists [B][Q][top_k]; one softmax and top-k for the whole batch."""
        probs = torch.softmax(logits.float(), dim=-1)
        top_probs, top_columns = probs.topk(self.config.top_k, dim=-1)
        head = self.draft.head_token_ids
        top_tokens = top_columns if head is None else head[top_columns]
        return top_tokens.tolist(), top_probs.tolist()
