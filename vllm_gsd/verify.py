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

from collections.abc import Callable, Sequence

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


def choose_tokens(logits: torch.Tensor, greedy: torch.Tensor | None,
                  noise: torch.Tensor | None,
                  argmax: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """One token per row from the target alone.

    Args:
        logits: [rows, vocab] the target's processed logits (temperature,
            top-k/top-p already applied).
        greedy: [rows] bool, rows of requests decoded at temperature 0
            (ignored when noise is None: every row is greedy).
        noise: [rows, vocab] independent Exp(1) draws, or None if every row
            is greedy. argmax(p / E) with E ~ Exp(1) is a sample from p (the
            exponential race; vLLM samples the same way), so each row gets
            an independent sample from its own distribution.
        argmax: [rows, vocab] float32 -> [rows], the greedy choice; by
            default `torch.argmax`. The engine passes the one its plain
            decoding samples with, so a greedy row breaks ties as plain
            decoding does.

    Returns:
        [rows] the chosen tokens.
    """
    best = argmax(logits) if argmax is not None else logits.argmax(dim=-1)
    if noise is None:
        return best
    sampled = logits.softmax(dim=-1, dtype=torch.float32).div(noise).argmax(dim=-1)
    return torch.where(greedy, best, sampled)
