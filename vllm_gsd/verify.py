"""Tree acceptance: which draft tokens the target keeps. Lossless.

The target scores the root and every flat node in one pass (row 0 = the
root, row j + 1 = flat node j). At each row we choose one token from the
target alone (argmax at temperature 0, one independent sample from the
target's processed distribution otherwise), then walk down from the root:
while the current node has a child carrying its row's chosen token, descend;
at the first row whose chosen token is no child (a leaf included), emit that
token and stop. Each emitted token is thus drawn from the target given the
emitted prefix, exactly as in plain decoding, whatever the (deterministic)
draft tree was: SpecInfer's "naive sampling" (arXiv 2305.09781).

The reference code's sampling mode accepts each child with min(1, p / q) and
keeps the longest accepted path, without residual resampling; that changes
the output distribution (research notes §4.2, §5), so it is not offered.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vllm_gsd.graph import FlatTree


def accept(chosen: Sequence[int], tree: FlatTree) -> tuple[list[int], int]:
    """Walk the tree along the target's chosen tokens.

    Args:
        chosen: [n + 1] the token chosen at each row; row 0 is the root.
        tree: the n draft nodes that were scored.

    Returns:
        (flat indices of the accepted draft nodes, root to leaf; the final
        token: the chosen token of the last accepted row, the bonus or the
        correction).
    """
    if len(chosen) != len(tree) + 1:
        raise ValueError(f"need one chosen token per row (root + {len(tree)} nodes); got {len(chosen)}")
    path = []
    node = -1
    while True:
        token = int(chosen[node + 1])
        child = tree.child(node, token)
        if child is None:
            return path, token
        path.append(child)
        node = child


def accept_batch(
    chosen: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    depths: torch.Tensor,
    num_nodes: torch.Tensor,
) -> torch.Tensor:
    """`accept` for a padded batch of trees, as an accepted-node mask.

    Args:
        chosen: [batch, N + 1] chosen token per row; row 0 is the root.
        tokens: [batch, N] draft tokens.
        parents: [batch, N] flat parent index, -1 = the root; padding must
            still lie in [-1, N).
        depths: [batch, N] node depths (1 = child of the root).
        num_nodes: [batch] how many of the N nodes are real.

    Returns:
        [batch, N] bool, True on the accepted path of each tree. The final
        token is `chosen` at the row after the deepest accepted node (row 0
        if none).
    """
    num_slots = tokens.shape[1]
    real = torch.arange(num_slots, device=tokens.device) < num_nodes[:, None]
    parent_rows = parents + 1
    match = real & (tokens == chosen.gather(1, parent_rows))
    root_accepted = torch.ones_like(match[:, :1])
    accepted = torch.zeros_like(match)
    # After d rounds every accepted node of depth <= d is found: a node is
    # accepted when its token matches and its parent is accepted.
    max_depth = int(depths.masked_fill(~real, 0).max()) if num_slots else 0
    for _ in range(max_depth):
        accepted = match & torch.cat([root_accepted, accepted], dim=1).gather(1, parent_rows)
    return accepted


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows]: the target's argmax at each row."""
    return logits.argmax(dim=-1)


def sample_choice(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[rows, vocab] -> [rows]: one independent sample per row.

    Args:
        probs: the target's processed distribution (temperature, top-k/p
            already applied), rows summing to 1.
    """
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
