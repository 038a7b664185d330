"""GSD's own counters, kept in each worker beside vLLM's spec-decode metrics.

vLLM's `vllm:spec_decode_*` metrics stay meaningful without help: drafts =
verified tree nodes, accepted = accepted path length. These counters add what
only GSD knows (graph size, merges, draft work). Read them with
`llm.collective_rpc(vllm_gsd.metrics.worker_stats)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    """Nodes of the unrolled trees sent for verification."""
    verified_nodes: int = 0
    """Tree nodes the target scored (after the scheduler's truncation)."""
    accepted_tokens: int = 0
    """Draft tokens accepted (bonus tokens excluded)."""
    verify_steps: int = 0
    """Request-steps verified with at least one draft node."""
    off_first_branch_accepts: int = 0
    """Accepted paths that left the first branch (needed the KV fix-up)."""
    plain_fallbacks: int = 0
    """Request-steps decoded without a tree because of their sampling options."""

    def observe_graph(self, graph: TokenGraph, tree: FlatTree) -> None:
        self.graphs += 1
        self.graph_nodes += graph.num_nodes - 1
        self.merged_edges += graph.num_merged
        self.tree_nodes += len(tree)

    def observe_acceptance(self, num_verified: int, path: list[int]) -> None:
        if num_verified == 0:
            return
        self.verify_steps += 1
        self.verified_nodes += num_verified
        self.accepted_tokens += len(path)
        if path != list(range(len(path))):
            self.off_first_branch_accepts += 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def worker_stats(worker: Any) -> dict[str, Any]:
    """`collective_rpc` target: this worker's GSD counters."""
    return worker.model_runner.drafter.stats.as_dict()
