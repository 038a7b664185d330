"""Tree attention as "branch replay" around any stock attention backend.

The stock forward computes every row causally; for a tree step the rows of
the first branch are already exact (see `vllm_gsd.step`). Each wave then
writes one off-first branch path's K/V into the request's own slots and
re-runs the same backend forward causally for that branch's rows only.

It needs from the backend only what every vLLM backend with a separate KV
write (`forward_includes_kv_cache_update = False`) has: `do_kv_cache_update`
and `forward` over metadata from its own builder. So it never reads the KV
cache layout (CPU_ATTN packs it per ISA) and works on CPU and GPU alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vllm.forward_context import get_forward_context

from vllm_gsd.step import RowSelector, TreeStep

_active_step: TreeStep | None = None


def set_active_step(step: TreeStep | None) -> None:
    """The step the next target forward belongs to (None: no tree)."""
    global _active_step
    _active_step = step


def active_step() -> TreeStep | None:
    return _active_step


def tree_forward(stock_forward: Callable[..., torch.Tensor], impl: Any,
                 layer: Any, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, kv_cache: torch.Tensor,
                 attn_metadata: Any, output: torch.Tensor,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
    stock_forward(impl, layer, query, key, value, kv_cache, attn_metadata,
                  output, *args, **kwargs)
    step = _active_step
    if step is None or not step.waves or attn_metadata is None:
        return output
    slot_mapping = get_forward_context().slot_mapping[layer.layer_name]
    step.stash[layer.layer_name] = (
        layer, _copied(key, step.stash_rows), _copied(value, step.stash_rows),
        _copied(slot_mapping, step.stash_rows))
    for wave in step.waves:
        impl.do_kv_cache_update(layer, key[wave.path_rows], value[wave.path_rows],
                                kv_cache, slot_mapping[wave.path_slot_rows])
        rows = wave.query_rows
        if isinstance(rows, slice):  # a view: the kernel writes the rows in place
            wave_output = output[rows]
        else:
            wave_output = output.new_empty((len(rows), *output.shape[1:]))
        stock_forward(impl, layer, query[rows], key[rows], value[rows], kv_cache,
                      wave.metadata[layer.layer_name], wave_output, *args, **kwargs)
        if not isinstance(rows, slice):
            output[rows] = wave_output
    return output


def _copied(tensor: torch.Tensor, rows: RowSelector) -> torch.Tensor:
    """Those rows, in memory of their own (index tensors gather a copy already)."""
    picked = tensor[rows]
    return picked.clone() if isinstance(rows, slice) else picked


def rewrite_accepted_kv(step: TreeStep, accepted: dict[int, list[int]]) -> None:
    """After acceptance: puts each replayed request's accepted path K/V into
    the slots of positions root+1..root+len(path) on every layer, which the
    scheduler keeps (vllm/v1/core/sched/scheduler.py rolls back the rest).

    accepted: batch_index -> flat node indices of the accepted path.
    """
    src, dst = [], []
    for batch_index, path in accepted.items():
        offset = step.stash_offset.get(batch_index)
        if offset is None or not path:
            continue
        src += [offset + node for node in path]
        dst += [offset + depth for depth in range(len(path))]
    if not src or not step.stash:
        return
    device = next(iter(step.stash.values()))[1].device
    src_rows = torch.tensor(src, device=device)
    dst_rows = torch.tensor(dst, device=device)
    for layer, keys, values, slots in step.stash.values():
        layer.impl.do_kv_cache_update(layer, keys[src_rows], values[src_rows],
                                      layer.kv_cache, slots[dst_rows])
