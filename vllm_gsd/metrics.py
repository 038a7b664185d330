"""GSD's own counters, kept in each worker beside vLLM's spec-decode metrics.

vLLM's `vllm:spec_decode_*` metrics stay meaningful without help: drafts =
verified tree nodes, accepted = accepted path length. These counters add what
only GSD knows (graph size, merges, draft work, the budget's cuts). They
reach vLLM's Prometheus registry as `vllm:gsd_<counter>` (so `/metrics` and
`LLM.get_metrics()` show them, with vLLM's `model_name` and `engine` labels):
each step's increments ride from the worker to the front end with vLLM's
own scheduler stats (`vllm_gsd.patches` P7). A worker's running totals are
also readable with `llm.collective_rpc(vllm_gsd.metrics.worker_stats)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from vllm_gsd.graph import FlatTree, TokenGraph


@dataclass
class GSDStats:
    draft_steps: int = 0
    """Engine steps in which at least one request was drafted."""
    draft_forward_passes: int = 0
    """Batched draft forward passes (catch-up and one per level)."""
    draft_tokens: int = 0
    """Query tokens the draft computed (catch-up tokens and graph nodes)."""
    graphs: int = 0
    """Graphs drafted (one per request per step)."""
    graph_nodes: int = 0
    """Graph nodes created, roots excluded."""
    merged_edges: int = 0
    """Candidates merged into an existing node instead of being drafted."""
    tree_nodes: int = 0
    """Nodes of the trees sent for verification (after the budget's cut)."""
    budget_cut_nodes: int = 0
    """Unrolled tree nodes the adaptive budget left unverified."""
    undrafted_by_budget: int = 0
    """Request-steps not drafted because the budget found drafting would
    not pay (plain decoding for that step)."""
    verified_nodes: int = 0
    """Tree nodes the target scored (after the scheduler's truncation)."""
    accepted_tokens: int = 0
    """Draft tokens accepted (bonus tokens excluded)."""
    verify_steps: int = 0
    """Request-steps verified with at least one draft node."""
    off_first_branch_accepts: int = 0
    """Accepted paths that left the first branch (needed the KV fix-up)."""
    replayed_branches: int = 0
    """Off-first branches recomputed by branch replay (`vllm_gsd.step`),
    summed over request-steps."""
    replay_waves: int = 0
    """Replay waves, summed over target steps: each is one more attention
    call per layer, which on a GPU costs about as much as a small kernel
    launch sequence whatever its rows (docs/benchmarks.md, "GPU cost curves")."""
    lookup_nodes: int = 0
    """Tree nodes sent for verification on a context-lookup path (drafted
    too or not; `vllm_gsd.lookup`)."""
    lookup_accepted_tokens: int = 0
    """Accepted tokens on a context-lookup path."""
    plain_fallbacks: int = 0
    """Request-steps decoded without a tree because of their sampling options."""
    _reported: dict[str, int] = field(default_factory=dict, repr=False)

    def observe_graph(self, graph: TokenGraph) -> None:
        self.graphs += 1
        self.graph_nodes += graph.num_nodes - 1
        self.merged_edges += graph.num_merged

    def observe_tree(self, tree: FlatTree, num_lookup_nodes: int) -> None:
        self.tree_nodes += len(tree)
        self.lookup_nodes += num_lookup_nodes

    def observe_acceptance(self, num_verified: int, path: list[int]) -> None:
        if num_verified == 0:
            return
        self.verify_steps += 1
        self.verified_nodes += num_verified
        self.accepted_tokens += len(path)
        if path != list(range(len(path))):
            self.off_first_branch_accepts += 1

    def observe_replay(self, branches: int, waves: int) -> None:
        self.replayed_branches += branches
        self.replay_waves += waves

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in counter_names()}

    def take_increments(self) -> dict[str, int]:
        """What grew since the last call (non-zero counters only)."""
        now = self.as_dict()
        increments = {k: v - self._reported.get(k, 0) for k, v in now.items()
                      if v != self._reported.get(k, 0)}
        self._reported = now
        return increments


def counter_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(GSDStats) if not f.name.startswith("_"))


# This process's registered GSD counters: a new engine's replace them, as
# vLLM's own PrometheusStatLogger replaces vLLM's (unregister_vllm_metrics).
_registered: list[Any] = []


class PrometheusCounters:
    """`vllm:gsd_<counter>` in the front end's Prometheus registry, labelled
    like vLLM's own metrics (vllm/v1/metrics/loggers.py)."""

    def __init__(self, model_name: str, engine_indexes: list[int]):
        import prometheus_client

        for collector in _registered:
            try:
                prometheus_client.REGISTRY.unregister(collector)
            except KeyError:  # vLLM already unregistered it
                pass
        _registered.clear()
        self.counters: dict[str, dict[int, Any]] = {}
        for name in counter_names():
            counter = prometheus_client.Counter(
                f"vllm:gsd_{name}", f"GSD: {name.replace('_', ' ')} "
                "(vllm_gsd.metrics.GSDStats)", labelnames=["model_name", "engine"])
            _registered.append(counter)
            self.counters[name] = {i: counter.labels(model_name, str(i))
                                   for i in engine_indexes}

    def record(self, engine_index: int, increments: dict[str, int]) -> None:
        for name, value in increments.items():
            per_engine = self.counters.get(name, {})
            if engine_index in per_engine:
                per_engine[engine_index].inc(value)


def worker_stats(worker: Any) -> dict[str, Any]:
    """`collective_rpc` target: this worker's GSD counters."""
    return worker.model_runner.drafter.stats.as_dict()
