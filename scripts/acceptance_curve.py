"""Tokens per target pass against verified nodes per step: chain, tree, merging.

    python scripts/acceptance_curve.py [--budgets 1 2 4 8 16 32 64] [--draft DIR]
        [--cap-budget 16] [--caps [8 16 32 64 128 256]] [--max-tokens 64]
        [--paper-depths 3 4 5] [--dtype auto] [--out DIR]

At temperature 0 the accepted length is fixed by the draft and the target,
not by the machine, so this measures what the tree buys per verified node
without timing noise. For each budget N (tree nodes the target verifies per
request-step), on the benchmark's prompts (scripts/benchmark.py), all 8 in
one batch, whole trees (`budget: fixed`):
  - vLLM's `draft_model` chain with K = N (N <= --max-vllm-k), the reference;
  - GSD with top_k 1: the same chain through GSD's own verifier;
  - GSD trees: top_k 4, drafted N levels deep, the N most probable nodes
    verified; with merging (merge_context 1) and without it (-1).
Then, at N = --cap-budget, the trees with and without merging for each
graph size cap (`max_draft_nodes`) of --caps. Under a cap both graphs
draft about as many nodes; merging shows as more τ for the same draft
work, so its saving is read across caps: the draft tokens merging needs
for a τ the unmerged graph reaches with more.
Last, the paper's own regime (--paper-depths): graphs with no size cap,
top_k 4, sibling_ratio 0.2 (the reference code's grid), every level to
depth D drafted, the 100 most probable tree nodes verified (the
reference's max_token): merging at τ = 1 and τ = 0 against none. There
a merged candidate's subtree is really not drafted, so merging shows as
fewer draft tokens for about the same τ.
Reports τ (1 + accepted tokens / request-steps), verified nodes and draft
tokens computed per request-step, and the merge rate; writes
OUT/acceptance_curve.json and OUT/acceptance_curve.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import PROMPTS, Engine, Method, machine, pick_dtype, summarize  # noqa: E402
from prepare_models import DISTILLED_DRAFT_NAME, TARGET_NAME, default_out_dir  # noqa: E402

KINDS = ("vLLM chain", "GSD chain", "GSD tree", "GSD tree no merge")
PAPER_MERGE_CONTEXTS = (1, 0, -1)
PAPER_GRAPH = {"top_k": 4, "sibling_ratio": 0.2, "min_node_prob": 0.0,
               "max_draft_nodes": 4096, "max_verify_nodes": 100}
"""The reference code's graph (research notes §3.4, §9): no size cap (our
largest), its sibling-threshold grid's 0.2, its 100 verified tree tokens."""


def method(kind: str, budget: int, draft: str, cap: int | None = None) -> Method:
    if kind == "vLLM chain":
        return Method(f"{kind} K={budget}", {"method": "draft_model", "model": draft,
                                             "num_speculative_tokens": budget}, budget)
    shape = {"method": "gsd", "model": draft, "budget": "fixed", "max_depth": budget,
             "max_verify_nodes": budget, "min_node_prob": 0.0, "sibling_ratio": 0.0}
    if kind == "GSD chain":
        shape.update(top_k=1, merge_context=-1)
        return Method(f"{kind} N={budget}", shape)
    shape.update(top_k=4, max_draft_nodes=cap or max(32, 4 * budget),
                 merge_context=1 if kind == "GSD tree" else -1)
    return Method(f"{kind} N={budget} cap={shape['max_draft_nodes']}", shape)


def paper_method(depth: int, merge_context: int, draft: str) -> Method:
    return Method(f"paper D={depth} merge_context={merge_context}",
                  {"method": "gsd", "model": draft, "budget": "fixed", **PAPER_GRAPH,
                   "max_depth": depth, "merge_context": merge_context})


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Acceptance against verified nodes {report['started']}", "",
             f"- machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, vLLM {m['vllm']}",
             f"- target `{report['target']}`, draft `{report['draft']}`, dtype "
             f"{report['dtype']}, T=0, {report['max_tokens']} new tokens for each of "
             f"8 prompts, one batch", "",
             "| verified nodes N | " + " | ".join(f"τ {k}" for k in KINDS)
             + " | tree / chain τ | draft tokens / req-step, merged vs not | merge rate "
             "| same outputs |",
             "|---" * (len(KINDS) + 5) + "|"]
    for row in report["rows"]:
        s = row["methods"]
        tau = [f"{s[k]['tau']:.2f}" if k in s else "" for k in KINDS]
        ratio = s["GSD tree"]["tau"] / s["GSD chain"]["tau"]
        merged = s["GSD tree"]["draft_tokens_per_request_step"]
        unmerged = s["GSD tree no merge"]["draft_tokens_per_request_step"]
        lines.append(f"| {row['budget']} | " + " | ".join(tau)
                     + f" | {ratio:.2f}x | {merged:.1f} vs {unmerged:.1f} "
                     f"({merged / unmerged:.2f}x) | {s['GSD tree']['merge_rate']:.3f} "
                     f"| {'yes' if row['same_outputs'] else 'NO'} |")
    if report["cap_sweep"]:
        lines += ["", f"## Merging, {report['cap_budget']} verified nodes, by graph size cap", "",
                  "| max_draft_nodes | τ merged | draft tokens / req-step merged | merge rate "
                  "| τ no merge | draft tokens / req-step no merge |",
                  "|---|---|---|---|---|---|"]
        for row in report["cap_sweep"]:
            m, u = row["methods"]["GSD tree"], row["methods"]["GSD tree no merge"]
            lines.append(f"| {row['cap']} | {m['tau']:.2f} | {m['draft_tokens_per_request_step']:.1f} "
                         f"| {m['merge_rate']:.3f} | {u['tau']:.2f} "
                         f"| {u['draft_tokens_per_request_step']:.1f} |")
    if report["paper_regime"]:
        lines += ["", "## Merging in the paper's regime: no graph size cap, top_k "
                  f"{PAPER_GRAPH['top_k']}, sibling_ratio {PAPER_GRAPH['sibling_ratio']}, "
                  f"{PAPER_GRAPH['max_verify_nodes']} nodes verified", "",
                  "| depth | merge_context | τ | τ / unmerged | draft tokens / req-step "
                  "| / unmerged | verified / req-step | merge rate | same outputs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in report["paper_regime"]:
            base = row["methods"]["-1"]
            for merge_context in PAPER_MERGE_CONTEXTS:
                s = row["methods"][str(merge_context)]
                lines.append(
                    f"| {row['depth']} | {merge_context} | {s['tau']:.2f} "
                    f"| {s['tau'] / base['tau']:.3f} | {s['draft_tokens_per_request_step']:.1f} "
                    f"| {s['draft_tokens_per_request_step'] / base['draft_tokens_per_request_step']:.2f}x "
                    f"| {s['verified_per_request_step']:.1f} | {s['merge_rate']:.3f} "
                    f"| {'yes' if row['same_outputs'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    models = default_out_dir()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=str(models / TARGET_NAME))
    parser.add_argument("--draft", default=str(models / DISTILLED_DRAFT_NAME))
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--cap-budget", type=int, default=16)
    parser.add_argument("--caps", type=int, nargs="*", default=[8, 16, 32, 64, 128, 256],
                        help="graph size caps of the merging sweep (none: no sweep)")
    parser.add_argument("--paper-depths", type=int, nargs="*", default=[3, 4, 5],
                        help="graph depths of the paper-regime merging sweep (none: no sweep)")
    parser.add_argument("--max-vllm-k", type=int, default=8,
                        help="largest K run with vLLM's draft_model (its chain "
                             "drafts K tokens every step whatever they earn)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    args = parser.parse_args()
    dtype = pick_dtype(args.dtype)
    ctx = mp.get_context("spawn")
    from tqdm import tqdm

    report = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine(), "target": args.target, "draft": args.draft,
              "dtype": dtype, "max_tokens": args.max_tokens, "rows": [],
              "cap_budget": args.cap_budget, "cap_sweep": [], "paper_regime": []}
    # (report section, the row's key there, the method's label in the row, method)
    jobs = [("rows", n, kind, method(kind, n, args.draft)) for n in args.budgets
            for kind in KINDS if kind != "vLLM chain" or n <= args.max_vllm_k]
    jobs += [("cap_sweep", cap, kind, method(kind, args.cap_budget, args.draft, cap))
             for cap in args.caps for kind in ("GSD tree", "GSD tree no merge")]
    jobs += [("paper_regime", depth, str(merge_context),
              paper_method(depth, merge_context, args.draft))
             for depth in args.paper_depths for merge_context in PAPER_MERGE_CONTEXTS]
    results: dict[tuple, dict] = {}
    outputs: dict[tuple, list] = {}
    for section, key, kind, spec in tqdm(jobs, desc="engines"):
        engine = Engine(ctx, args.target, spec, dtype, 1024)
        engine.wait_ready()
        run = engine.run(batch=len(PROMPTS), temperature=0.0,
                         max_tokens=args.max_tokens)
        engine.close()
        results.setdefault((section, key), {})[kind] = summarize(spec, [run], [run])
        outputs.setdefault((section, key), []).append(run["token_ids"])
    reference = next(iter(outputs.values()))[0]  # greedy: every method's outputs equal
    row_key = {"rows": "budget", "cap_sweep": "cap", "paper_regime": "depth"}
    for (section, key), methods in results.items():
        report[section].append({row_key[section]: key, "methods": methods, "same_outputs":
                                all(o == reference for o in outputs[(section, key)])})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "acceptance_curve.json").write_text(json.dumps(report, indent=1))
    (args.out / "acceptance_curve.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
