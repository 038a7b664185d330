"""Verify and draft cost curves on a GPU, and the GSD speedup they project.

    # on a GPU machine; needs PyTorch and NumPy only, not vLLM:
    PYTHONPATH=. python scripts/gpu_cost_curve.py measure [--out DIR]
        [--context 1024] [--batch-sizes 1 16] [--shapes llama-2-70b ...]
    # anywhere:
    python scripts/gpu_cost_curve.py project DIR/cost_curve.json
        [--acceptance ACCEPTANCE_JSON] [--host-ms 0 2] [--out DIR]

Whether a tree pays depends on what a target pass of n tokens costs against
one of 1 token. On our 2-core CPU a pass of 4-6 tokens already costs more;
a GPU reads every weight once per pass, so it verifies far more tokens for
about the price of one. This script measures that curve where vLLM cannot
run (the GPU machines lent to this project have no package registry, and
vLLM's CUDA wheel, 326.5 MB, is over what a call may carry).

`measure` builds random-weight Llama decoder stacks of real model shapes
(Llama-2-70B and -7B as targets, TinyLlama-1.1B as the draft, the reference
code's drafter), bfloat16, and times one forward pass per (batch size,
tokens per request) over a KV cache of --context tokens per request. The
tokens of a request are laid out as a GSD tree would be: a root and a
top-4 tree in `FlatTree` order, attending through `FlatTree.ancestor_mask`,
at positions by depth, their K/V written into the cache as the pass runs.
Each pass is captured as a CUDA graph, as vLLM runs decoding, and timed by
device events over its replays (median). 70B's 80 layers and their cache
do not fit one GPU, so a stack of --layers-70b layers is timed and scaled
to 80; the LM head (over every row, as verification needs) is timed apart
and added once. Before timing, a small float32 model checks that the tree
pass gives every node the logits of running its root-to-node path as a
plain causal sequence. Last, for each target shape, it times the pass with
0-32 branch replay waves after every layer's attention (what the plugin
runs to verify a tree on any attention backend: `vllm_gsd.attention`),
eagerly, as the plugin's attention runs outside vLLM's piecewise CUDA
graphs. Writes OUT/cost_curve.json.

`project` combines such a curve with τ measured on the real small models
(`scripts/acceptance_curve.py`'s JSON: τ, draft passes and draft tokens per
step for each verified-node budget N, for vLLM's chain and for GSD's
tree). A step's time is then

    draft passes x t_draft(batch, draft tokens per pass)
        + t_target(batch, N + 1) + host

and its speedup over plain decoding τ x t_target(batch, 1) / step time, at
the best N of each method: once with the tree verified in that one pass (a
tree attention mask, as the paper's code does), once as the plugin verifies
it, each replayed branch (`replayed_branches` per request-step, measured
with the τ) adding a wave. This is a projection, not a measurement: τ is the
bundled SmolLM2 pair's, not a 70B pair's, and `host` (the engine's own time
per step outside the two models, unmeasured on a GPU) is an assumption the
table shows at each --host-ms. Writes OUT/projection.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vllm_gsd.graph import FlatTree

TREE_TOP_K = 4
CHECK_TOLERANCE = 1e-4
"""Relative error allowed between a tree row and its path's causal row (float32)."""


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int = 32000


SHAPES = {s.name: s for s in (
    Shape("llama-2-70b", 8192, 64, 8, 128, 28672, 80),
    Shape("llama-2-70b-tp4-shard", 8192, 16, 2, 128, 7168, 80, vocab=8000),
    Shape("llama-2-7b", 4096, 32, 32, 128, 11008, 32),
    Shape("tinyllama-1.1b", 2048, 32, 4, 64, 5632, 22),
)}
"""`llama-2-70b-tp4-shard` is one GPU's share of 70B under tensor parallelism
4 (a quarter of the heads, the MLP and the vocabulary): its curve leaves out
the two all-reduces per layer that the ranks exchange."""
CHECK_SHAPE = Shape("check", 256, 8, 2, 32, 512, 2, vocab=1000)
PROJECTED = (("llama-2-70b", "tinyllama-1.1b"), ("llama-2-70b-tp4-shard", "tinyllama-1.1b"),
             ("llama-2-7b", "tinyllama-1.1b"))
"""(target, draft) pairs `project` reports."""
CUDA_GRAPH_SIZES = (1, 2, 4, *range(8, 256, 8), *range(256, 513, 16))
"""vLLM's default CUDA graph sizes (tokens per pass; vllm/config/vllm.py
`_set_cudagraph_sizes`): a pass runs padded to the next one, so `project`
reads costs only at these totals up to 512 (odd sizes take other GEMM kernels)."""
WAVE_PATH_ROWS = 3
WAVE_QUERY_ROWS = 2
"""A replay wave's rows per request: the path whose K/V it writes (a
depth-3 tree's deepest branch and its ancestors) and the branch's own rows."""
WAVE_PASSES = ((1, 33), (16, 3))
"""(batch, rows per request) where `measure_waves` times replay waves: a
depth-3 graph's 32 nodes alone, one or two nodes each in a batch of 16."""


def top_k_tree(num_nodes: int) -> FlatTree:
    """The first `num_nodes` nodes of a complete top-4 tree, level by level:
    the shape of a GSD tree that verifies that many nodes (the cost of a
    pass depends on its token count and mask, not on which tokens)."""
    parents = [-1 if j < TREE_TOP_K else j // TREE_TOP_K - 1 for j in range(num_nodes)]
    depths: list[int] = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    tokens = [j % TREE_TOP_K for j in range(num_nodes)]
    return FlatTree(tuple(tokens), tuple(parents), tuple(depths), (1.0,) * num_nodes)


def tree_rows(tree: FlatTree) -> tuple[np.ndarray, np.ndarray]:
    """The pass's rows: the root, then the tree's nodes. Returns each row's
    depth [n + 1] and the rows' attention among themselves [n + 1, n + 1]
    (a row sees the root, its ancestors and itself)."""
    n = len(tree)
    mask = np.zeros((n + 1, n + 1), dtype=bool)
    mask[:, 0] = True
    mask[1:, 1:] = tree.ancestor_mask()
    return np.array((0, *tree.depths)), mask


class RandomLlama:
    """A Llama decoder stack with random weights and a static KV cache for
    `batch` requests of `context` cached tokens plus up to `max_new` new ones.
    `layers` may be fewer than the shape's: costs are per layer."""

    def __init__(self, shape: Shape, layers: int, batch: int, context: int, max_new: int,
                 dtype: torch.dtype, device: str, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)

        def weight(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=gen, dtype=dtype, device=device) * 0.02

        s = self.shape = shape
        d = s.head_dim
        self.context = context
        self.embedding = weight(s.vocab, s.hidden)
        self.layers = [dict(
            qkv=weight(s.hidden, (s.heads + 2 * s.kv_heads) * d),
            out=weight(s.heads * d, s.hidden),
            gate_up=weight(s.hidden, 2 * s.intermediate),
            down=weight(s.intermediate, s.hidden),
            norm_attn=1 + weight(s.hidden), norm_mlp=1 + weight(s.hidden),
            k_cache=weight(batch, s.kv_heads, context + max_new, d) * 50,
            v_cache=weight(batch, s.kv_heads, context + max_new, d) * 50,
        ) for _ in range(layers)]
        self.norm = 1 + weight(s.hidden)
        self.lm_head = weight(s.hidden, s.vocab)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        angles = torch.outer(torch.arange(context + max_new, device=device, dtype=torch.float32), inv_freq)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps=1e-5)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [batch, heads, n, head_dim] rotated at positions [n]."""
        cos, sin = self.cos[positions], self.sin[positions]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def layers_forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                       mask: torch.Tensor | None, waves: int = 0) -> torch.Tensor:
        """tokens [batch, n] at cache slots context..context+n-1, positions
        [n]; mask [n, context + n] (True: attend) or None (n = 1). Writes the
        rows' K/V into the cache; returns the hidden states [batch, n, hidden].

        `waves`: after each layer's attention, that many branch replay waves
        as `vllm_gsd.attention.tree_forward` runs them (a K/V write of a
        path, an attention call for a branch's rows over it, their output
        written back), of WAVE_PATH_ROWS and WAVE_QUERY_ROWS rows per
        request: their cost, not their arithmetic (`measure_waves`)."""
        s, (b, n) = self.shape, tokens.shape
        d, end, group = s.head_dim, self.context + n, s.heads // s.kv_heads
        # The query heads that share a K/V head attend as one head of
        # group x n rows, so grouped-query attention reads the cache once
        # and SDPA takes its fused kernels (as a paged decode kernel would).
        group_mask = None if mask is None else mask.repeat(group, 1)
        x = self.embedding[tokens]
        for layer in self.layers:
            qkv = (self._rms(x, layer["norm_attn"]) @ layer["qkv"]).view(b, n, -1, d).transpose(1, 2)
            q, k, v = qkv.split((s.heads, s.kv_heads, s.kv_heads), dim=1)
            k = self._rope(k, positions)
            layer["k_cache"][:b, :, self.context:end] = k
            layer["v_cache"][:b, :, self.context:end] = v
            q = self._rope(q, positions).reshape(b, s.kv_heads, group * n, d)
            attn = F.scaled_dot_product_attention(
                q, layer["k_cache"][:b, :, :end], layer["v_cache"][:b, :, :end], attn_mask=group_mask)
            path_end, branch_rows = self.context + WAVE_PATH_ROWS, group * WAVE_QUERY_ROWS
            for _ in range(waves):
                layer["k_cache"][:b, :, self.context:path_end] = k[:, :, :WAVE_PATH_ROWS]
                layer["v_cache"][:b, :, self.context:path_end] = v[:, :, :WAVE_PATH_ROWS]
                attn[:, :, :branch_rows] = F.scaled_dot_product_attention(
                    q[:, :, :branch_rows], layer["k_cache"][:b, :, :path_end],
                    layer["v_cache"][:b, :, :path_end])
            x = x + attn.reshape(b, s.heads, n, d).transpose(1, 2).reshape(b, n, -1) @ layer["out"]
            gate, up = (self._rms(x, layer["norm_mlp"]) @ layer["gate_up"]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer["down"]
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._rms(hidden, self.norm) @ self.lm_head

    def prefill(self, tokens: torch.Tensor) -> None:
        """Fills the cache's first len(tokens) slots causally (the check's prompt)."""
        n = tokens.shape[1]
        context, self.context = self.context, 0
        causal = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
        self.layers_forward(tokens, torch.arange(n, device=tokens.device), causal)
        self.context = context


def pass_inputs(model: RandomLlama, batch: int, rows: int, device: str):
    """Tokens, positions and mask of a pass of `rows` rows per request laid
    out as a root and a top-4 tree."""
    depths, tree_mask = tree_rows(top_k_tree(rows - 1))
    tokens = torch.randint(0, model.shape.vocab, (batch, rows), device=device)
    positions = torch.as_tensor(model.context + depths, device=device)
    if rows == 1:
        return tokens, positions, None
    mask = torch.ones(rows, model.context + rows, dtype=torch.bool, device=device)
    mask[:, model.context:] = torch.as_tensor(tree_mask, device=device)
    return tokens, positions, mask


def check_tree_pass(device: str) -> float:
    """Largest relative error between a tree row's logits and those of its
    root-to-node path run as a causal sequence after the same prompt."""
    torch.manual_seed(0)
    prompt_len, tree = 12, top_k_tree(9)
    rows = len(tree) + 1
    model = RandomLlama(CHECK_SHAPE, CHECK_SHAPE.layers, 1, prompt_len, rows,
                        torch.float32, device)
    model.prefill(torch.randint(0, CHECK_SHAPE.vocab, (1, prompt_len), device=device))
    cache = [(layer["k_cache"].clone(), layer["v_cache"].clone()) for layer in model.layers]
    tokens, positions, mask = pass_inputs(model, 1, rows, device)
    tree_logits = model.logits(model.layers_forward(tokens, positions, mask))[0]
    worst = 0.0
    for row in range(rows):
        path = [0] + [1 + j for j in tree.ancestors(row - 1)] + [row] if row else [0]
        for layer, (k, v) in zip(model.layers, cache):
            layer["k_cache"].copy_(k)
            layer["v_cache"].copy_(v)
        n = len(path)
        causal = torch.ones(n, prompt_len + n, dtype=torch.bool, device=device)
        causal[:, prompt_len:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        path_positions = torch.arange(prompt_len, prompt_len + n, device=device)
        path_logits = model.logits(model.layers_forward(tokens[:, path], path_positions, causal))[0, -1]
        error = ((path_logits - tree_logits[row]).norm() / path_logits.norm()).item()
        worst = max(worst, error)
    return worst


def time_pass(run, device: str, repeats: int, graph: bool = True) -> float:
    """Median milliseconds of `run()`; on CUDA timed by events around each
    call, captured as a graph and replayed unless `graph` is False."""
    if device == "cuda" and not graph:
        for _ in range(3):
            run()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)
    if device != "cuda":
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def measure_shape(shape: Shape, layers: int, batch_sizes: list[int], rows_by_batch: dict[int, list[int]],
                  context: int, device: str, repeats: int) -> dict:
    """Milliseconds of a whole-model pass (layers scaled to the shape's
    count, plus the LM head over every row) per batch size and rows per request."""
    max_rows = max(max(r) for r in rows_by_batch.values())
    model = RandomLlama(shape, layers, max(batch_sizes), context, max_rows, torch.bfloat16, device)
    curve = {}
    for batch in batch_sizes:
        for rows in rows_by_batch[batch]:
            tokens, positions, mask = pass_inputs(model, batch, rows, device)
            hidden = torch.randn(batch, rows, shape.hidden, dtype=torch.bfloat16, device=device)
            layers_ms = time_pass(lambda: model.layers_forward(tokens, positions, mask), device, repeats)
            head_ms = time_pass(lambda: model.logits(hidden), device, repeats)
            logits = model.logits(model.layers_forward(tokens, positions, mask))
            if not torch.isfinite(logits).all():
                raise RuntimeError(f"{shape.name}: non-finite logits at batch {batch}, {rows} rows")
            total = layers_ms * shape.layers / layers + head_ms
            curve.setdefault(str(batch), {})[str(rows)] = {
                "ms": total, "layers_ms": layers_ms, "head_ms": head_ms}
            print(f"  {shape.name} batch {batch:>2} rows {rows:>3}: {total:8.3f} ms "
                  f"({layers} layers {layers_ms:.3f} + head {head_ms:.3f})", flush=True)
    return curve


def measure_waves(shape: Shape, layers: int, context: int, device: str, repeats: int,
                  wave_counts: list[int]) -> dict:
    """Milliseconds of a whole-model pass (layers scaled, no LM head) with
    each number of branch replay waves, per `WAVE_PASSES`, run eagerly: the
    plugin runs vLLM's attention, and so its waves, outside the piecewise
    CUDA graphs (P11, `vllm_gsd/patches.py`), where each call's launch
    costs host time. Also the graphed pass without waves, for reference."""
    batch = max(b for b, _ in WAVE_PASSES)
    model = RandomLlama(shape, layers, batch, context, max(r for _, r in WAVE_PASSES),
                        torch.bfloat16, device)
    result = {}
    for batch, rows in WAVE_PASSES:
        tokens, positions, mask = pass_inputs(model, batch, rows, device)
        scale = shape.layers / layers
        times = {"graphed": scale * time_pass(
            lambda: model.layers_forward(tokens, positions, mask), device, repeats)}
        for waves in wave_counts:
            times[str(waves)] = scale * time_pass(
                lambda: model.layers_forward(tokens, positions, mask, waves), device, repeats,
                graph=False)
        result[f"{batch}x{rows}"] = times
        print(f"  {shape.name} batch {batch:>2} rows {rows:>3}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in times.items()) + " ms", flush=True)
    return result


def free_device_memory(device: str) -> None:
    """Returns the last model's memory (freed with its function's frame) to
    the device, so the next, larger one fits."""
    if device == "cuda":
        torch.cuda.empty_cache()


def layers_timed(name: str, args: argparse.Namespace) -> int:
    shape = SHAPES[name]
    return min(shape.layers, args.layers_70b if name == "llama-2-70b" else shape.layers)


def cmd_measure(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    error = check_tree_pass(device)
    print(f"tree pass against causal paths (float32): max relative error {error:.2e}", flush=True)
    if not error < CHECK_TOLERANCE:
        raise SystemExit(f"tree pass check failed: {error:.2e} >= {CHECK_TOLERANCE}")
    rows_by_batch = {b: [r for r in args.rows if b == 1 or r <= args.max_batched_rows]
                     for b in args.batch_sizes}
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "context": args.context, "dtype": "bfloat16", "check_max_rel_error": error,
        "shapes": {}, "curves": {}, "waves": {},
    }
    for name in args.shapes:
        shape = SHAPES[name]
        result["shapes"][name] = {**asdict(shape), "layers_timed": layers_timed(name, args)}
        result["curves"][name] = measure_shape(shape, layers_timed(name, args), args.batch_sizes,
                                               rows_by_batch, args.context, device, args.repeats)
        free_device_memory(device)
    targets = {target for target, _ in PROJECTED}
    for name in args.shapes if args.wave_counts else []:
        if name in targets:
            result["waves"][name] = measure_waves(SHAPES[name], layers_timed(name, args),
                                                  args.context, device, args.repeats,
                                                  args.wave_counts)
            free_device_memory(device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost_curve.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'cost_curve.json'}")


def pass_ms(curve: dict[str, dict], batch: int, rows: float) -> float:
    """Milliseconds of a pass of `rows` rows per request (a mean over steps
    may be fractional) at `batch` requests, padded to vLLM's next CUDA graph
    size; linear in tokens between the measured sizes."""
    tokens = batch * rows
    padded = next((size for size in CUDA_GRAPH_SIZES if size >= tokens), tokens)
    points = sorted((batch * int(r), v["ms"]) for r, v in curve.items()
                    if batch * int(r) in CUDA_GRAPH_SIZES or batch * int(r) > CUDA_GRAPH_SIZES[-1])
    if not points[0][0] <= padded <= points[-1][0]:
        raise ValueError(f"{padded} tokens is outside the measured {points[0][0]}..{points[-1][0]}")
    for (t0, ms0), (t1, ms1) in zip(points, points[1:]):
        if padded <= t1:
            return ms0 + (ms1 - ms0) * (padded - t0) / (t1 - t0)
    return points[-1][1]


def candidates(acceptance: dict):
    """(kind, label, measured step counts) of every configuration measured:
    the verified-node budgets' rows, and the paper's uncapped graphs."""
    for row in acceptance["rows"]:
        for kind in ("vLLM chain", "GSD tree"):
            if kind in row["methods"]:
                yield kind, f"N={row['budget']}", row["methods"][kind]
    for row in acceptance.get("paper_regime", []):
        for merge_context, kind in (("0", "GSD graph, merged"), ("-1", "GSD graph, unmerged")):
            yield kind, f"D={row['depth']}", row["methods"][merge_context]


def wave_ms(costs: dict, target: str, batch: int) -> float:
    """Milliseconds one more replay wave adds to a pass at `batch`
    (`measure_waves`: the mean over its first 16 waves)."""
    times = next(t for key, t in costs["waves"][target].items() if key.startswith(f"{batch}x"))
    return (times["16"] - times["0"]) / 16


def project(costs: dict, acceptance: dict, target: str, draft: str, batch: int,
            host_ms: float, replay: bool = False) -> dict[str, dict]:
    """Each kind's best projected speedup over plain decoding, with the
    configuration that gives it; a kind is missing where no configuration
    fits the curve. `replay`: GSD's trees are verified by branch replay, as
    the plugin does, each replayed branch costing a wave (at batch > 1 a
    lower bound: a wave serves one branch of every request, so a step
    pays for its most branched request)."""
    t_target = costs["curves"][target][str(batch)]
    t_draft = costs["curves"][draft][str(batch)]
    plain = pass_ms(t_target, batch, 1)
    per_wave = wave_ms(costs, target, batch) if replay else 0.0
    best: dict[str, dict] = {}
    for kind, label, m in candidates(acceptance):
        passes, rows = m["draft_passes_per_step"], m["verified_per_request_step"] + 1
        waves = m.get("replayed_branches_per_request_step") if kind != "vLLM chain" else 0.0
        if replay and waves is None:  # measured before the plugin counted them
            continue
        try:
            draft_ms = passes * pass_ms(t_draft, batch, m["draft_tokens_per_request_step"] / passes)
            step_ms = draft_ms + pass_ms(t_target, batch, rows) + host_ms + per_wave * (waves or 0.0)
        except ValueError:
            continue
        speedup = m["tau"] * plain / step_ms
        if kind not in best or speedup > best[kind]["speedup"]:
            best[kind] = {"speedup": speedup, "label": label, "tau": m["tau"], "rows": rows,
                          "step_ms": step_ms, "draft_ms": draft_ms, "plain_ms": plain}
    return best


KINDS = ("vLLM chain", "GSD tree", "GSD graph, merged", "GSD graph, unmerged")


def projection_table(costs: dict, acceptance: dict, host_ms_values: list[float],
                     replay: bool) -> list[str]:
    lines = ["| target / draft | batch | host ms | plain ms/token | "
             + " | ".join(f"{kind}: speedup (config, τ)" for kind in KINDS)
             + " | best GSD / chain |",
             "|---|---|---|---|" + "---|" * len(KINDS) + "---|"]
    for target, draft in PROJECTED:
        if target not in costs["curves"] or draft not in costs["curves"]:
            continue
        for batch in sorted(map(int, costs["curves"][target])):
            for host_ms in host_ms_values:
                best = project(costs, acceptance, target, draft, batch, host_ms, replay)
                cells = [f"{best[k]['speedup']:.2f}x ({best[k]['label']}, τ {best[k]['tau']:.2f})"
                         if k in best else "n/a" for k in KINDS]
                gsd = [best[k]["speedup"] for k in KINDS[1:] if k in best]
                ratio = f"{max(gsd) / best['vLLM chain']['speedup']:.2f}x" if gsd else "n/a"
                lines.append(f"| {target} / {draft} | {batch} | {host_ms:g} | "
                             f"{best['vLLM chain']['plain_ms']:.2f} | " + " | ".join(cells)
                             + f" | {ratio} |")
    return lines


def cmd_project(args: argparse.Namespace) -> None:
    costs = json.loads(args.costs.read_text())
    acceptance = json.loads(args.acceptance.read_text())
    lines = [
        f"Projection, not a measurement: pass costs measured on {costs['machine']['device']} "
        f"({costs['dtype']}, random weights, {costs['context']} cached tokens per request, "
        f"CUDA graphs, padded to vLLM's graph sizes), τ and draft work measured on the "
        f"bundled SmolLM2 pair ({acceptance['dtype']}, T=0, {acceptance['started'][:10]}). "
        f"Each method at its best measured configuration (N: verified nodes per "
        f"request-step; D: the paper's uncapped graph of that depth).", "",
        "## Trees verified in one pass (a tree attention mask, as the paper's code does)", "",
        *projection_table(costs, acceptance, args.host_ms, replay=False),
    ]
    if costs.get("waves"):
        lines += ["", "## Trees verified by branch replay, as the plugin does (one eager "
                  "attention wave per replayed branch, at its measured cost)", "",
                  *projection_table(costs, acceptance, args.host_ms, replay=True)]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "projection.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="time random-weight model passes (GPU)")
    m.add_argument("--out", type=Path, default=Path("gpu_cost_curve"))
    m.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    m.add_argument("--context", type=int, default=1024)
    m.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    m.add_argument("--rows", type=int, nargs="+",
                   default=[1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 56, 64, 72,
                            80, 96, 104, 112, 128, 192, 256],
                   help="rows (root + tree nodes) per request")
    m.add_argument("--max-batched-rows", type=int, default=72,
                   help="largest rows per request timed at batch sizes above 1")
    m.add_argument("--layers-70b", type=int, default=16)
    m.add_argument("--wave-counts", type=int, nargs="*", default=[0, 1, 4, 16, 32],
                   help="branch replay waves per pass to time (none: skip)")
    m.add_argument("--repeats", type=int, default=20)
    p = sub.add_parser("project", help="combine a cost curve with measured τ")
    p.add_argument("costs", type=Path)
    p.add_argument("--acceptance", type=Path, default=Path(
        "docs/benchmarks/2026-12-02-cpu-avx512-fp32-acceptance/acceptance_curve.json"))
    p.add_argument("--host-ms", type=float, nargs="+", default=[0.0, 2.0])
    p.add_argument("--out", type=Path, default=Path("gpu_cost_curve"))
    args = parser.parse_args()
    {"measure": cmd_measure, "project": cmd_project}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
