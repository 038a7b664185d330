"""The draft model: a Llama-family causal LM run with tree attention.

Drafting a graph needs what vLLM's attention backends cannot give a draft
today: one forward pass over many frontier nodes of many requests, each node
seeing only the prompt, the accepted tokens and its own ancestors, at position
root + depth. This module evaluates the draft's weights with masked attention
(`tree_attention`: PyTorch SDPA, or its own products for a few queries)
over an explicit boolean mask. The K/V of accepted tokens live in pages of vLLM's
KV cache, addressed through the request's block table like the target's
(`DraftKVCache`); a step's tree nodes live in a small scratch area.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

TOKEN_COUNTS_FILE = "gsd_token_counts.npy"
"""Optional file in a draft folder: int array [vocab], how often each
token occurred in text the target wrote (scripts/distill_draft.py writes it).
`draft_vocab_size` keeps the LM head rows of the most frequent tokens."""


def read_draft_config(path: str) -> dict:
    """The draft folder's config.json, checked against what this runner
    evaluates; raises ValueError naming what is unsupported. Sets
    "rope_theta": transformers >= 5 writes RoPE settings under
    "rope_parameters", older configs at the top level."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{path!r} is not a local model folder with a config.json (GSD loads "
            "drafts from disk; scripts/prepare_models.py builds the bundled ones).")
    with open(config_path) as f:
        cfg = json.load(f)
    architectures = cfg.get("architectures") or []
    if architectures != ["LlamaForCausalLM"]:
        raise ValueError(f"draft architecture {architectures} is not supported; "
                         "GSD drafts with LlamaForCausalLM models.")
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"draft RoPE scaling ({cfg.get('rope_scaling') or rope}) "
                         "is not supported by the GSD draft runner.")
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return cfg


def weight_files(path: str) -> list[str]:
    return [os.path.join(path, name) for name in sorted(os.listdir(path))
            if name.endswith(".safetensors")]


def _embedding_is_lm_head(cfg: dict, names) -> bool:
    """Whether the draft's LM head is its input embedding: tied in
    config.json, or no lm_head.weight among the folder's tensor `names`."""
    return cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in names


def _unreadable(file: str, error: Exception) -> ValueError:
    return ValueError(f"draft weights {file!r} cannot be read: {error}")


def expected_weight_shapes(cfg: dict, with_lm_head: bool) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor the draft's forward pass reads, by its name in
    the folder without "model."."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // num_heads
    q_rows = num_heads * head_dim
    kv_rows = cfg.get("num_key_value_heads", num_heads) * head_dim
    shapes = {"embed_tokens.weight": (vocab, hidden), "norm.weight": (hidden,)}
    if with_lm_head:
        shapes["lm_head.weight"] = (vocab, hidden)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"layers.{layer}."
        shapes |= {p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (q_rows, hidden),
                   p + "self_attn.k_proj.weight": (kv_rows, hidden),
                   p + "self_attn.v_proj.weight": (kv_rows, hidden),
                   p + "self_attn.o_proj.weight": (hidden, q_rows),
                   p + "mlp.gate_proj.weight": (inter, hidden),
                   p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter)}
    return shapes


def check_draft_weights(path: str, cfg: dict) -> None:
    """Reads the safetensors headers only (no tensor data): every tensor the
    draft needs must be there with the shape config.json implies, so a
    broken folder is refused at start-up with its reason instead of failing
    in the middle of serving. Raises ValueError."""
    files = weight_files(path)
    if not files:
        raise ValueError(f"draft folder {path!r} has no .safetensors weights.")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                shapes |= {name.removeprefix("model."): tuple(f.get_slice(name).get_shape())
                           for name in f.keys()}
        except (OSError, SafetensorError) as error:
            raise _unreadable(file, error) from error
    expected = expected_weight_shapes(cfg, not _embedding_is_lm_head(cfg, shapes))
    problems = [f"{name} missing" if name not in shapes else
                f"{name} has shape {shapes[name]}, config.json implies {shape}"
                for name, shape in expected.items() if shapes.get(name) != shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"draft weights in {path!r} do not match its config.json: "
                         + "; ".join(problems[:3]) + more)


def frequent_token_ids(path: str, num_tokens: int) -> torch.Tensor:
    """The `num_tokens` most frequent token ids of the draft folder's
    TOKEN_COUNTS_FILE, most frequent first (ties: lower id first); raises
    ValueError when the file is missing or too short."""
    counts_path = os.path.join(path, TOKEN_COUNTS_FILE)
    if not os.path.isfile(counts_path):
        raise ValueError(
            f"draft_vocab_size needs {TOKEN_COUNTS_FILE} in the draft folder "
            f"{path!r} (token frequencies; scripts/distill_draft.py writes it).")
    # Not .safetensors: loaders (vLLM's among them) read every such file as weights.
    counts = torch.from_numpy(np.load(counts_path))
    if num_tokens > counts.numel():
        raise ValueError(f"draft_vocab_size {num_tokens} exceeds the "
                         f"{counts.numel()} tokens counted in {counts_path}.")
    return torch.sort(counts, descending=True, stable=True).indices[:num_tokens]


SINK = 0
"""Paged slot 0 lies in vLLM's null block (block 0, never given to a
request) and scratch row 0 is never handed out: padded queries write there
and padded key columns read from there, always masked out."""


@dataclass
class DraftKVCache:
    """Where the draft's K/V live.

    pages: per layer [num_blocks, 2 (K, V), block_size, kv_heads, head_dim],
        views into vLLM's KV cache allocation. Token position p of a request
        is slot `block_ids[p // block_size] * block_size + p % block_size`
        of the request's block table, as for the target, so the draft's
        cache is sized, shared, freed and preempted with the target's.
    scratch: [num_layers, rows, 2, kv_heads, head_dim], this step's tree
        nodes (and accepted tokens whose block the scheduler has not
        allocated yet); rewritten every step.
    """

    pages: list[torch.Tensor]
    block_size: int
    scratch: torch.Tensor

    def ensure_scratch_rows(self, rows: int) -> None:
        """Grows the scratch area (between steps: its content is lost)."""
        if rows > self.scratch.shape[1]:
            shape = (self.scratch.shape[0], rows) + self.scratch.shape[2:]
            self.scratch = self.scratch.new_zeros(shape)


GROUPED_ATTENTION_MAX_QUERIES = 4
"""Queries per request up to which `tree_attention` multiplies out the
scores itself (when the batch has more than one request, or one query)."""


def tree_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """Masked attention with grouped K/V heads: q [B, H, Q, D], keys and
    values [B, kvH, K, D], mask [B, 1, Q, K] bool. Returns [B, H, Q, D].

    PyTorch's CPU SDPA (its flash kernel, for any mask) pays about 0.2 ms
    per request when a request has one query, and more than the plain
    products below for a few queries in a batch: at 16 requests of 1 query
    over 300 keys, 3.4 ms against 0.25 ms (2 threads, bf16); a draft pass
    runs it once per layer. For longer queries (a catch-up after a prompt)
    its tiling wins: 2.5 ms against 4.8 at 16 requests of 16 queries.
    Other devices keep SDPA (not measured there)."""
    batch, num_heads, num_queries, head_dim = q.shape
    if (q.device.type != "cpu" or num_queries > GROUPED_ATTENTION_MAX_QUERIES
            or (batch == 1 and num_queries > 1)):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    # Query head h reads K/V head h // group (SDPA's enable_gqa): the group's
    # queries become rows of one product per K/V head.
    scores = torch.matmul(
        (q * head_dim ** -0.5).reshape(batch, num_kv_heads, group * num_queries, head_dim),
        keys.transpose(-1, -2)).view(batch, num_kv_heads, group, num_queries, num_keys)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs.view(batch, num_kv_heads, group * num_queries, num_keys),
                        values).view(batch, num_heads, num_queries, head_dim)


Linear = Callable[[torch.Tensor], torch.Tensor]
"""x [..., in] -> x @ weight.T [..., out], for one fixed weight."""


def torch_linear(weight: torch.Tensor) -> Linear:
    return lambda x: F.linear(x, weight)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@dataclass(frozen=True)
class DenseKernels:
    """The dense operations of the draft's forward pass.

    A draft pass multiplies a handful of rows by every weight, so it is
    bound by how a GEMM reads its weight, not by arithmetic: PyTorch's
    defaults are correct everywhere, and the glue layer may hand in kernels
    that prepack the weights once (`vllm_gsd.proposer` does on CPU).
    """

    prepare_linear: Callable[[torch.Tensor], Linear] = torch_linear
    """Called once per weight at load; the weight is not used afterwards."""
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = torch_rms_norm


LINEAR_WEIGHTS = ("qkv", "self_attn.o_proj.weight", "gate_up", "mlp.down_proj.weight")
"""Per-layer weights the forward pass multiplies by (after `_load_weights`
fuses q/k/v and gate/up), under "layers.N."; plus "lm_head.weight"."""


class TreeDraftModel:
    """Llama weights, evaluated over a `DraftKVCache`.

    With `head_vocab` > 0 the LM head keeps only the rows of the draft
    folder's `head_vocab` most frequent tokens (the idea of FR-Spec, Zhao et
    al. 2025): a narrow draft spends most of its time in its vocab-wide head,
    and tokens it never proposes cost nothing in losslessness, because the
    target verifies every token. Logits then index `head_token_ids`.
    """

    def __init__(self, path: str, dtype: torch.dtype, device: torch.device,
                 head_vocab: int = 0, kernels: DenseKernels = DenseKernels()):
        cfg = read_draft_config(path)
        self.num_layers = cfg["num_hidden_layers"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg.get("num_key_value_heads", self.num_heads)
        self.hidden = cfg["hidden_size"]
        self.head_dim = cfg.get("head_dim") or self.hidden // self.num_heads
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.vocab_size = cfg["vocab_size"]
        self.dtype, self.device = dtype, device
        check_draft_weights(path, cfg)
        self.weights = self._load_weights(path, cfg)
        self.head_token_ids: torch.Tensor | None = None
        """Token id of each logit column; None when the head is the full vocab."""
        if head_vocab:
            self.head_token_ids = frequent_token_ids(path, head_vocab).to(device)
            self.weights["lm_head.weight"] = (
                self.weights["lm_head.weight"][self.head_token_ids].contiguous())
        self._rms_norm = kernels.rms_norm
        self.linears: dict[str, Linear] = {
            name: kernels.prepare_linear(self.weights.pop(name))
            for name in ["lm_head.weight"] + [f"layers.{layer}.{weight}"
                                              for layer in range(self.num_layers)
                                              for weight in LINEAR_WEIGHTS]}
        theta = cfg["rope_theta"]
        self.inv_freq = 1.0 / (theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
            / self.head_dim))

    def new_scratch(self, rows: int) -> torch.Tensor:
        return torch.zeros((self.num_layers, rows, 2, self.num_kv_heads, self.head_dim),
                           dtype=self.dtype, device=self.device)
    def _load_weights(self, path: str, cfg: dict) -> dict[str, torch.Tensor]:
        weights: dict[str, torch.Tensor] = {}
        for file in weight_files(path):
            try:
                weights.update(load_file(file))
            except (OSError, SafetensorError) as error:
                raise _unreadable(file, error) from error
        weights = {k.removeprefix("model."): v.to(self.device, self.dtype)
                   for k, v in weights.items()}
        if _embedding_is_lm_head(cfg, weights):
            weights["lm_head.weight"] = weights["embed_tokens.weight"]
        # One matmul for q, k, v and one for gate, up: fewer, larger GEMMs.
        for layer in range(self.num_layers):
            p = f"layers.{layer}."
            weights[p + "qkv"] = torch.cat([weights.pop(p + f"self_attn.{x}_proj.weight")
                                            for x in "qkv"])
            weights[p + "gate_up"] = torch.cat([weights.pop(p + f"mlp.{x}_proj.weight")
                                                for x in ("gate", "up")])
        return weights

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [B, 1, Q, head_dim] for positions [B, Q]."""
        freqs = positions.float()[:, None, :, None] * self.inv_freq
        angles = torch.cat((freqs, freqs), -1)
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    @torch.inference_mode()
    def forward(self, cache: DraftKVCache, tokens: torch.Tensor,
                positions: torch.Tensor, write_slots: torch.Tensor,
                write_rows: torch.Tensor, read_slots: torch.Tensor,
                read_rows: torch.Tensor, attend: torch.Tensor,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Runs queries of several requests, writing their K/V into `cache`.

        tokens, positions: [B, Q].
        write_slots, write_rows: [B, Q], where each query's K/V go: a paged
            slot and a scratch row, one of them (both for padding) SINK.
        read_slots [B, P], read_rows [B, S]: the key columns of each row,
            paged slots first, then scratch rows (padding: SINK).
        attend: [B, Q, P + S] bool, which key columns each query sees (its
            own included).
        logits_at: [B], the one query per row whose logits are wanted (a
            catch-up needs only its last token's); None: every query's.
            The last layer then attends and runs its MLP for those queries
            only: the others need no output, only their K/V.
        Returns the draft's next-token logits, [B, Q or 1, head vocab]
        (columns are token ids unless `head_token_ids` maps them).
        """
        w, linear = self.weights, self.linears
        batch, num_queries = tokens.shape
        mask = attend[:, None]  # broadcast over heads
        cos, sin = self._rope_tables(positions)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        write_blocks, write_offsets = write_slots // cache.block_size, write_slots % cache.block_size
        read_blocks, read_offsets = read_slots // cache.block_size, read_slots % cache.block_size
        x = w["embed_tokens.weight"][tokens]
        rows = torch.arange(batch, device=x.device)
        for layer in range(self.num_layers):
            p = f"layers.{layer}."
            qkv = linear[p + "qkv"](self._rms_norm(x, w[p + "input_layernorm.weight"], self.eps))
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(batch, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.view(batch, num_queries, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, num_queries, self.num_kv_heads, self.head_dim)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            if logits_at is not None and layer == self.num_layers - 1:
                q = q[rows, :, logits_at][:, :, None]  # [B, H, 1, D]
                x, mask = x[rows, logits_at][:, None], mask[rows, :, logits_at][:, :, None]
            new_kv = torch.stack((k.transpose(1, 2), v), dim=2)  # [B, Q, 2, kvH, D]
            pages, scratch = cache.pages[layer], cache.scratch[layer]
            # Advanced indices around a slice put [B, Q] first: [B, Q, 2, kvH, D].
            pages[write_blocks, :, write_offsets] = new_kv
            scratch[write_rows] = new_kv
            seen = torch.cat((pages[read_blocks, :, read_offsets], scratch[read_rows]), dim=1)
            keys, values = seen.unbind(2)  # [B, P + S, kvH, D] each
            attn = tree_attention(q, keys.transpose(1, 2), values.transpose(1, 2), mask)
            attn = attn.transpose(1, 2).reshape(batch, x.shape[1], -1)
            x = x + linear[p + "self_attn.o_proj.weight"](attn)
            gate, up = linear[p + "gate_up"](
                self._rms_norm(x, w[p + "post_attention_layernorm.weight"], self.eps)
            ).chunk(2, dim=-1)
            x = x + linear[p + "mlp.down_proj.weight"](F.silu(gate) * up)
        return linear["lm_head.weight"](self._rms_norm(x, w["norm.weight"], self.eps))
