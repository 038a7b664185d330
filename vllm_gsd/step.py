"""TreeStep: the one description of this step's trees that every stage reads.

Built once per target step right after vLLM prepared its inputs, it fixes the
topology (tokens, parents, depths) of every request's draft tree. Positions,
attention, acceptance and the KV fix-up all read it, so they cannot disagree:
whatever tree it holds is verified exactly (a stale or truncated tree is just
a different tree, still exact).

Row layout, from vLLM (gpu_model_runner.py `_prepare_inputs`): a request's
scheduled tokens are consecutive rows; its drafts are the last ones, right
after the root (the token sampled last step). vLLM gives them sequential
positions and sequential KV slots: flat node j sits in the slot of position
root + 1 + j. We keep the slots and move the positions to root + depth.

Attention ("branch replay"): vLLM's causal kernels already compute the root
and the first branch exactly, because flat order equals depth order there.
Every other maximal run of the flat order (`FlatTree.branches`) is recomputed
in a "wave": its path's K/V are written into the slots of positions root+1..
root+depth (slots owned by this request and not yet valid for anyone else),
and the stock kernel runs causally over that pseudo-sequence. Waves of
different requests share one kernel call; the w-th wave of every request
goes together. The K/V fix-up after acceptance rewrites the accepted path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_gsd.budget import StepShape
from vllm_gsd.graph import Branch, FlatTree


@dataclass
class TreeRequest:
    """One request's tree in this step."""

    batch_index: int
    root_row: int
    """Token row of the root; flat node j is row root_row + 1 + j."""
    root_position: int
    tree: FlatTree
    off_first_branches: list[Branch]
    """Branches recomputed in waves; if any, waves overwrote the request's
    slots and the fix-up must rewrite the accepted path."""

    @property
    def replayed(self) -> bool:
        return bool(self.off_first_branches)


RowSelector = torch.Tensor | slice
"""Rows of the step's token tensors: a slice where they are consecutive (a
view: no gather, and a kernel writes through it; one request's branch
usually is), else an index tensor. Replay selects rows once per layer and
wave, so the difference is paid dozens of times a step."""


def _row_selector(rows: list[int], device: torch.device) -> RowSelector:
    first = rows[0] if rows else 0
    if rows == list(range(first, first + len(rows))):
        return slice(first, first + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


@dataclass
class Wave:
    """One kernel call recomputing one off-first branch of several requests."""

    query_rows: RowSelector
    """[q] rows whose attention output is recomputed."""
    path_rows: RowSelector
    """[p] rows whose K/V are written for the pseudo-sequences."""
    path_slot_rows: RowSelector
    """[p] rows whose KV slots receive them (positions root+1..root+depth)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Attention metadata per layer name, built by each layer's own builder."""


@dataclass
class TreeStep:
    requests: list[TreeRequest]
    waves: list[Wave]
    stash_rows: RowSelector
    """[s] rows of every replayed request's nodes, stashed per layer for the
    K/V fix-up."""
    stash_offset: dict[int, int]
    """batch_index -> offset of its first node in the stash."""
    stash: dict[str, tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)
    """layer name -> (layer, keys [s], values [s], slot mapping [s])."""

    def by_batch_index(self) -> dict[int, TreeRequest]:
        return {r.batch_index: r for r in self.requests}

    @property
    def replayed_branches(self) -> int:
        return sum(len(r.off_first_branches) for r in self.requests)


def build_tree_step(runner: Any, scheduler_output: Any,
                    trees: dict[str, FlatTree]) -> TreeStep | None:
    """Collects this step's trees, rewrites positions, plans the waves.

    `trees` are the proposer's trees by request id; entries used here are
    removed. A request whose scheduled drafts are not a prefix of its tree
    (the runner zeroed them, or vLLM padded placeholders) is verified as a
    chain of its scheduled drafts.
    """
    batch = runner.input_batch
    query_start = runner.query_start_loc.cpu
    requests = []
    for req_id, drafts in scheduler_output.scheduled_spec_decode_tokens.items():
        if not drafts:
            continue
        index = batch.req_id_to_index[req_id]
        tree = trees.pop(req_id, None)
        if tree is None or tuple(drafts) != tree.tokens[:len(drafts)]:
            tree = FlatTree.chain(drafts)
        else:
            tree = tree.truncated(len(drafts))
        root_row = int(query_start[index + 1]) - len(drafts) - 1
        root_position = int(runner.positions[root_row])
        requests.append(TreeRequest(index, root_row, root_position, tree,
                                    tree.branches()[1:]))
    if not requests:
        return None
    _set_tree_positions(runner.positions, requests)
    replayed = [r for r in requests if r.replayed]
    stash_rows, stash_offset = [], {}
    for r in replayed:
        stash_offset[r.batch_index] = len(stash_rows)
        stash_rows += range(r.root_row + 1, r.root_row + 1 + len(r.tree))
    device = runner.positions.device
    waves = _plan_waves(runner, replayed, device)
    return TreeStep(requests, waves,
                    _row_selector(stash_rows, device),
                    stash_offset)


def tree_step_shape(step: TreeStep | None, scheduler_output: Any) -> StepShape | None:
    """What the budget's cost model needs to know of a target step; None for
    a step with prompt tokens. The budget prices decode steps; a prefill's
    cost grows with its prompt in ways a per-token line does not follow, and
    fitted alongside it bends the line where the trees are priced."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    if any(n != 1 + len(spec.get(req_id, ()))
           for req_id, n in scheduler_output.num_scheduled_tokens.items()):
        return None
    num_tokens = scheduler_output.total_num_scheduled_tokens
    if step is None:
        return StepShape(num_tokens)
    return StepShape(num_tokens, len(step.requests), step.replayed_branches, len(step.waves))


def _set_tree_positions(positions: torch.Tensor,
                        requests: list[TreeRequest]) -> None:
    rows, values = [], []
    for r in requests:
        rows += range(r.root_row + 1, r.root_row + 1 + len(r.tree))
        values += [r.root_position + d for d in r.tree.depths]
    positions[torch.tensor(rows, device=positions.device)] = torch.tensor(
        values, dtype=positions.dtype, device=positions.device)


def _plan_waves(runner: Any, replayed: list[TreeRequest],
                device: torch.device) -> list[Wave]:
    num_waves = max((len(r.off_first_branches) for r in replayed), default=0)
    waves = []
    for w in range(num_waves):
        members = [r for r in replayed if len(r.off_first_branches) > w]
        query_rows, path_rows, path_slot_rows = [], [], []
        query_lens, seq_lens = [], []
        for r in members:
            branch = r.off_first_branches[w]
            run = range(branch.start, branch.end + 1)
            path = list(branch.ancestors) + list(run)
            query_rows += [r.root_row + 1 + j for j in run]
            path_rows += [r.root_row + 1 + j for j in path]
            path_slot_rows += [r.root_row + 1 + k for k in range(len(path))]
            query_lens.append(len(run))
            seq_lens.append(r.root_position + 1 + len(path))
        wave = Wave(_row_selector(query_rows, device), _row_selector(path_rows, device),
                    _row_selector(path_slot_rows, device))
        _build_wave_metadata(runner, wave, [r.batch_index for r in members],
                             query_lens, seq_lens, device)
        waves.append(wave)
    return waves


def _build_wave_metadata(runner: Any, wave: Wave, batch_indices: list[int],
                         query_lens: list[int], seq_lens: list[int],
                         device: torch.device) -> None:
    """Metadata for the wave's pseudo-requests, from each layer's own builder,
    so the wave runs through the very kernel (and ISA) of the main pass."""
    query_start_cpu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    query_start_cpu[1:] = torch.tensor(query_lens).cumsum(0)
    num_reqs = runner.input_batch.num_reqs
    for gid, attn_groups in enumerate(runner.attn_groups):
        block_table = runner.input_batch.block_table[gid]
        common = CommonAttentionMetadata(
            query_start_loc=query_start_cpu.to(device),
            query_start_loc_cpu=query_start_cpu,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            num_reqs=len(query_lens),
            num_actual_tokens=int(query_start_cpu[-1]),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_table_tensor=block_table.get_device_tensor(num_reqs)[
                torch.tensor(batch_indices, device=device)],
            slot_mapping=block_table.slot_mapping.gpu[wave.query_rows],
            causal=True,
        )
        for attn_group in attn_groups:
            metadata = attn_group.get_metadata_builder().build(0, common)
            for layer_name in attn_group.layer_names:
                wave.metadata[layer_name] = metadata
