"""Benchmark GSD against plain vLLM and vLLM's own speculative methods, in one run.

    python scripts/benchmark.py [--draft DIR] [--batch-sizes 1 4 16]
        [--temperatures 0 0.7] [--repeats 3] [--max-tokens 64]
        [--chain-ks 1 2 3 4 5] [--dtype auto] [--gsd JSON] [--static-batches]
        [--compile] [--out DIR]

Same target, same draft, same prompts (chat, code, summarization-style and
maths, none of them in the distillation prompt set):
  1. chain sweep: vLLM's `draft_model` at each K of --chain-ks, batch 1,
     temperature 0; the fastest K is "the chain at its best K" below;
  2. main run: plain vLLM, the chain at its best K, vLLM's `ngram`, GSD
     (settings tuned for this CPU), GSD without context lookup, and GSD on
     deep graphs with merging and without it (the same budgets) each live
     in their own process; every repeat visits every (batch size,
     temperature) workload and runs it on every method, in an order rotated
     per repeat, so machine noise hits all methods alike.

Batch size b means b requests in flight: 4b requests (at least one per
prompt) are queued and each one that finishes is replaced by the next, as
under a server's steady load or in an offline job larger than its batch.
Their lengths vary around --max-tokens (0.5x to 1.5x, the same for every
method), as real requests' do.
`--static-batches` runs separate batches of exactly b requests instead (runs
1-24 in docs/benchmarks.md), where a batch takes as many steps as its
slowest request: speculation that shortens other requests gains nothing
until the batch drains.

Reported per method and workload: tokens/s (median of repeats, min-max),
speedup over plain (median of the per-repeat ratios), τ (tokens per target
pass: 1 + accepted / request-steps with drafts), acceptance by depth, draft
forward passes per engine step, draft tokens computed per request-step,
verified nodes per request-step, GSD's merge rate, and whether greedy outputs
equal plain decoding's. Writes OUT/results.json, OUT/results.md and
OUT/speedup.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

sys.path.insert(0, str(Path(__file__).parent))
from prepare_models import DISTILLED_DRAFT_NAME, TARGET_NAME, default_out_dir  # noqa: E402

# (kind, text, chat-templated?)
PROMPTS = [
    ("chat", "What is a good way to start learning to play the guitar?", True),
    ("chat", "My tomato plants have yellow leaves. What should I do?", True),
    ("code", "Write a Python function that counts the vowels in a string.", True),
    ("code", "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists.\"\"\"\n", False),
    ("summary", "Summarize in two sentences: The city council voted on Tuesday to "
                "extend the bike lane network by twelve kilometres over the next two "
                "years. Supporters said it would cut traffic and pollution, while some "
                "shop owners worried about losing parking spaces in front of their "
                "stores. The plan will be funded by a regional transport grant.", True),
    ("summary", "Give a short summary of how vaccines train the immune system.", True),
    ("math", "A train travels 180 km in 2 hours. What is its average speed? "
             "Explain step by step.", True),
    ("math", "Question: If a shirt costs 25 dollars and is discounted by 20 percent, "
             "what is the new price?\nAnswer:", False),
]

DEEP_GRAPH = {"max_depth": 5, "max_verify_nodes": 16, "max_draft_nodes": 48}
# Merging is compared on whole trees: the adaptive budget would cut the two
# graphs differently and blur the draft work each one needs.
WHOLE_TREES = {"budget": "fixed"}
# GSD without context lookup: the draft's graph alone (merging is compared
# on it, so that lookup paths, the same with merging or without, do not
# dilute the difference).
NO_LOOKUP = {"lookup_tokens": 0}
METHOD_KINDS = ("plain", "draft_model", "ngram", "GSD", "GSD no lookup", "GSD fixed",
                "GSD deep", "GSD deep no merge")

# Seconds between two methods' runs: idle OpenMP threads of the previous
# engine spin briefly on these two shared cores.
SETTLE_S = 1.0


@dataclass(frozen=True)
class Method:
    name: str
    speculative_config: dict | None
    chain_k: int = 0
    """Draft forward passes per step of a chain method (0: none or not a chain)."""


def machine() -> dict:
    import torch
    import vllm

    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(),
            "isa": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "vllm": vllm.__version__,
            "python": platform.python_version()}


def pick_dtype(requested: str) -> str:
    """float32 unless the CPU multiplies bf16 natively (shared/models/README.md:
    bf16 matmuls with more than one row are ~4x slower than fp32 on AVX2)."""
    if requested != "auto":
        return requested
    flags = ""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return "bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"


# ---------------------------------------------------------------------------
# One method's engine, in its own process
# ---------------------------------------------------------------------------

def engine_process(conn, target: str, method: Method, dtype: str, max_model_len: int,
                   compile_target: bool):
    # Each method's engine lives in its own process (vLLM's metrics registry
    # is per process); its engine core runs inside that process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    llm = LLM(model=target, dtype=dtype, enforce_eager=not compile_target,
              max_model_len=max_model_len,
              seed=0, disable_log_stats=False, speculative_config=method.speculative_config)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True)
               if chat else text for _, text, chat in PROMPTS]
    is_gsd = (method.speculative_config or {}).get("method") == "gsd"
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            break
        conn.send(run_workload(llm, prompts, is_gsd, **job))
    llm.llm_engine.engine_core.shutdown()


def counters(llm, is_gsd: bool) -> dict:
    from vllm.v1.metrics.reader import Counter, Vector

    out: dict = {"per_pos": []}
    for m in llm.get_metrics():
        if not m.name.startswith("vllm:spec_decode"):
            continue
        if isinstance(m, Counter):
            out = combine(out, {m.name: m.value})
        elif isinstance(m, Vector):
            out = combine(out, {"per_pos": m.values})
    if is_gsd:
        from vllm_gsd.metrics import worker_stats
        out["gsd"] = llm.collective_rpc(worker_stats)[0]
    return out


def _zip_pad(a: list, b: list):
    n = max(len(a), len(b))
    return zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))


QUEUED_BATCHES = 4
"""A closed-loop workload of batch b queues this many times b requests (at
least every prompt once), b of them in flight at any time."""

LENGTH_FACTORS = (1.0, 0.5, 1.5, 0.75, 1.25)
"""Request i of a closed-loop workload asks for this factor (cycled) times
--max-tokens new tokens: real requests differ in length, and a queue of
equal ones would keep its batch in lockstep, every request finishing in the
same step and the next ones' prompts prefilled together, which happens
under no real load (and favours whichever method keeps the lockstep)."""


def generate_closed_loop(llm, requests: list[str], params: list, concurrency: int) -> list:
    """Outputs of `requests` (in order; params[i] for request i), decoded
    with `concurrency` of them in flight: each one that finishes is
    replaced by the next in the queue, as a server under steady load or an
    offline job larger than the batch refills its batch."""
    engine = llm.llm_engine
    ids = [f"bench-{time.monotonic_ns()}-{i}" for i in range(len(requests))]
    queued = list(zip(ids, requests, params))[::-1]
    finished = {}
    while queued or engine.has_unfinished_requests():
        while queued and engine.get_num_unfinished_requests() < concurrency:
            engine.add_request(*queued.pop())
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return [finished[i] for i in ids]


def cycled(prompts: list[str], count: int) -> list[str]:
    """`count` requests taking the prompts in turn."""
    return [prompts[i % len(prompts)] for i in range(count)]


def run_workload(llm, prompts: list[str], is_gsd: bool, batch: int, temperature: float,
                 max_tokens: int, static: bool = False, warmup: bool = False) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
    if warmup:  # one full batch
        llm.generate(cycled(prompts, batch), params, use_tqdm=False)
        return {}
    if static:  # every prompt at least once, in full batches of `batch` requests
        num = -(-max(batch, len(prompts)) // batch) * batch
    else:
        num = max(QUEUED_BATCHES * batch, len(prompts))
    requests = cycled(prompts, num)
    before = counters(llm, is_gsd)
    start = time.perf_counter()
    outputs = []
    if static:
        for i in range(0, num, batch):
            outputs += llm.generate(requests[i:i + batch], params, use_tqdm=False)
    else:
        outputs = generate_closed_loop(llm, requests, [
            SamplingParams(temperature=temperature, max_tokens=max(1, round(
                max_tokens * LENGTH_FACTORS[i % len(LENGTH_FACTORS)])))
            for i in range(num)], batch)
    seconds = time.perf_counter() - start
    after = counters(llm, is_gsd)
    return {"seconds": seconds,
            "tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
            "delta": combine(after, before, -1)}


def combine(a: dict, b: dict, sign: int = 1) -> dict:
    """a + sign * b, key by key, for counter snapshots: numbers, the per-depth
    vector ("per_pos", padded to the longer) and GSD's counters ("gsd")."""
    out = {}
    for key in a.keys() | b.keys():
        x, y = a.get(key), b.get(key)
        if key == "per_pos":
            out[key] = [u + sign * v for u, v in _zip_pad(x or [], y or [])]
        elif key == "gsd":
            out[key] = combine(x or {}, y or {}, sign)
        else:
            out[key] = (x or 0) + sign * (y or 0)
    return out


class Engine:
    """A method's engine process and the pipe to it."""

    def __init__(self, ctx, target: str, method: Method, dtype: str, max_model_len: int,
                 compile_target: bool = False):
        self.method = method
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=engine_process,
                                   args=(child, target, method, dtype, max_model_len,
                                         compile_target))
        self.process.start()

    def wait_ready(self) -> None:
        if self.conn.recv() != "ready":
            raise RuntimeError(f"{self.method.name}: engine failed to start")

    def run(self, **job) -> dict:
        self.conn.send(job)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=60)


# ---------------------------------------------------------------------------
# Derived metrics
# ---------------------------------------------------------------------------

def summarize(method: Method, runs: list[dict], plain_runs: list[dict]) -> dict:
    tok_s = [r["tokens"] / r["seconds"] for r in runs]
    ratios = [t / (p["tokens"] / p["seconds"]) for t, p in zip(tok_s, plain_runs)]
    d = functools.reduce(combine, [r["delta"] for r in runs], {})
    drafts = d.get("vllm:spec_decode_num_drafts", 0)
    summary = {
        "tok_s_median": statistics.median(tok_s), "tok_s_min": min(tok_s),
        "tok_s_max": max(tok_s), "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios), "speedup_max": max(ratios),
        # Per repeat, in order: how a machine's phases moved the numbers.
        "tok_s_repeats": tok_s, "speedup_repeats": ratios,
        "tau": 1.0, "accept_by_depth": [], "verified_per_request_step": 0.0,
        "draft_passes_per_step": 0.0, "draft_tokens_per_request_step": 0.0,
        "merge_rate": None, "lookup_share": None, "replayed_branches_per_request_step": 0.0,
    }
    if drafts:
        accepted = d["vllm:spec_decode_num_accepted_tokens"]
        summary["tau"] = 1 + accepted / drafts
        summary["accept_by_depth"] = [round(n / drafts, 3) for n in d["per_pos"] if n]
        summary["verified_per_request_step"] = d["vllm:spec_decode_num_draft_tokens"] / drafts
    g = d.get("gsd")
    if g and g["draft_steps"]:
        summary["draft_passes_per_step"] = g["draft_forward_passes"] / g["draft_steps"]
        summary["draft_tokens_per_request_step"] = g["draft_tokens"] / max(g["graphs"], 1)
        candidates = g["graph_nodes"] + g["merged_edges"]
        summary["merge_rate"] = g["merged_edges"] / candidates if candidates else 0.0
    if g and g["verify_steps"]:
        summary["replayed_branches_per_request_step"] = (g["replayed_branches"]
                                                         / g["verify_steps"])
    elif method.chain_k and drafts:
        # vLLM's draft_model: the first pass feeds the tokens accepted last step
        # (τ on average), each of the K-1 further passes one token.
        summary["draft_passes_per_step"] = float(method.chain_k)
        summary["draft_tokens_per_request_step"] = summary["tau"] + method.chain_k - 1
    # Lookup paths are verified in undrafted steps too, so apart from the above.
    if g and g["accepted_tokens"]:
        summary["lookup_share"] = g["lookup_accepted_tokens"] / g["accepted_tokens"]
    return summary


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------

def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Benchmark {report['started']}",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, ISA {m['isa']}; torch {m['torch']}, "
        f"vLLM {m['vllm']}",
        f"- target `{report['target']}`, draft `{report['draft']}`, dtype {report['dtype']}, "
        f"{'target compiled' if report.get('compiled') else 'enforce_eager'}, "
        f"{report['max_tokens']} new tokens per request, "
        f"{report['repeats']} repeats",
        "- batch b: " + ("separate batches of b requests" if report.get("static_batches") else
                         f"{QUEUED_BATCHES}b requests (at least one per prompt) of "
                         f"{'/'.join(map(str, LENGTH_FACTORS))} x the new tokens queued, "
                         "b in flight, each finished one replaced by the next"),
        f"- GSD: `{json.dumps(report['gsd_config'])}`",
        "",
    ]
    if report["chain_sweep"]:
        lines += ["## vLLM draft_model chain sweep (batch 1, T=0)", "",
                  "| K | tok/s | acceptance per drafted token | τ |", "|---|---|---|---|"]
        for k, s in report["chain_sweep"].items():
            lines.append(f"| {k} | {s['tok_s']:.1f} | {s['acceptance']:.3f} | {s['tau']:.2f} |")
        lines += ["", f"Best K: {report['best_chain_k']}.", ""]
    lines += ["## Side by side", "",
              "| batch | T | method | tok/s median [min-max] | speedup vs plain [min-max] "
              "| τ | acceptance by depth | verified nodes / req-step "
              "| draft passes / step | draft tokens / req-step | merge rate "
              "| accepted via lookup | = plain |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in report["workloads"]:
        for name, s in w["methods"].items():
            merge = "" if s["merge_rate"] is None else f"{s['merge_rate']:.2f}"
            lookup = "" if s.get("lookup_share") is None else f"{s['lookup_share']:.2f}"
            same = {True: "yes", False: "NO", None: ""}[s.get("identical_to_plain")]
            lines.append(
                f"| {w['batch']} | {w['temperature']} | {name} "
                f"| {s['tok_s_median']:.1f} [{s['tok_s_min']:.1f}-{s['tok_s_max']:.1f}] "
                f"| {s['speedup_median']:.2f}x [{s['speedup_min']:.2f}-{s['speedup_max']:.2f}] "
                f"| {s['tau']:.2f} | {' '.join(f'{a:.2f}' for a in s['accept_by_depth'])} "
                f"| {s['verified_per_request_step']:.1f} | {s['draft_passes_per_step']:.1f} "
                f"| {s['draft_tokens_per_request_step']:.1f} | {merge} | {lookup} | {same} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = report["workloads"]
    names = list(workloads[0]["methods"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(workloads)), 4))
    for i, name in enumerate(names):
        s = [w["methods"][name] for w in workloads]
        med = [x["speedup_median"] for x in s]
        err = [[m - x["speedup_min"] for m, x in zip(med, s)],
               [x["speedup_max"] - m for m, x in zip(med, s)]]
        ax.bar([j + i * width for j in range(len(workloads))], med, width, yerr=err,
               label=name, capsize=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))])
    ax.set_xticklabels([f"batch {w['batch']}\nT={w['temperature']}" for w in workloads])
    ax.set_ylabel("speedup over plain vLLM (median, min-max)")
    ax.set_title(f"{report['machine']['cpu']}, {report['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    models = default_out_dir()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--target", default=str(models / TARGET_NAME))
    parser.add_argument("--draft", default=str(models / DISTILLED_DRAFT_NAME))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--chain-ks", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--ngram-k", type=int, default=3)
    parser.add_argument("--dtype", default="auto",
                        help="auto: bfloat16 where the CPU has bf16 instructions, else float32")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_KINDS),
                        choices=list(METHOD_KINDS), help="which methods to run")
    parser.add_argument("--gsd", default="{}",
                        help="JSON overriding GSD keys of the benchmark's default config")
    parser.add_argument("--static-batches", action="store_true",
                        help="run each batch size as separate batches of exactly that many "
                             "requests (runs up to 24), instead of a queue kept that many in flight")
    parser.add_argument("--compile", action="store_true",
                        help="let vLLM compile the target (its default without enforce_eager; "
                             "about a minute more per engine start) instead of running eagerly")
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    return parser.parse_args()


def default_gsd_config(draft: str) -> dict:
    """The GSD settings measured best for the bundled pair on a 2-core CPU
    (docs/benchmarks.md): shallow and narrow, because every draft level
    costs a draft pass and every verified node a share of a target pass."""
    from vllm_gsd.draft_model import TOKEN_COUNTS_FILE

    config = {"method": "gsd", "model": draft, "top_k": 4, "merge_context": 1,
              "sibling_ratio": 0.1, "max_depth": 2, "max_verify_nodes": 6}
    if (Path(draft) / TOKEN_COUNTS_FILE).is_file():
        config["draft_vocab_size"] = 4096
    return config


def main() -> None:
    from tqdm import tqdm

    args = parse_args()
    ctx = mp.get_context("spawn")
    dtype = pick_dtype(args.dtype)
    gsd = {**default_gsd_config(args.draft), **json.loads(args.gsd)}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    start_engine = lambda m: Engine(ctx, args.target, m, dtype,  # noqa: E731
                                    args.max_model_len, args.compile)
    job = dict(batch=1, temperature=0.0, max_tokens=args.max_tokens)

    sweep = {}
    chain_ks = args.chain_ks if "draft_model" in args.methods else []
    for k in tqdm(chain_ks, desc="chain sweep"):
        engine = start_engine(Method(f"draft_model K={k}", {
            "method": "draft_model", "model": args.draft, "num_speculative_tokens": k}, k))
        engine.wait_ready()
        engine.run(**job, warmup=True)
        r = engine.run(**job)
        engine.close()
        d = r["delta"]
        drafts = d["vllm:spec_decode_num_drafts"] or 1
        sweep[k] = {"tok_s": r["tokens"] / r["seconds"],
                    "acceptance": d["vllm:spec_decode_num_accepted_tokens"]
                    / max(d["vllm:spec_decode_num_draft_tokens"], 1),
                    "tau": 1 + d["vllm:spec_decode_num_accepted_tokens"] / drafts}
    best_k = max(sweep, key=lambda k: sweep[k]["tok_s"]) if sweep else None

    methods = {
        "plain": Method("plain", None),
        "draft_model": Method(f"draft_model K={best_k}", {
            "method": "draft_model", "model": args.draft,
            "num_speculative_tokens": best_k}, best_k or 0),
        "ngram": Method(f"ngram K={args.ngram_k}", {
            "method": "ngram", "num_speculative_tokens": args.ngram_k,
            "prompt_lookup_min": 2, "prompt_lookup_max": 4}),
        "GSD": Method("GSD", gsd),
        "GSD no lookup": Method("GSD no lookup", {**gsd, **NO_LOOKUP}),
        "GSD fixed": Method("GSD fixed", {**gsd, **WHOLE_TREES}),
        # Merging needs depth: at the tuned depth of 2 a candidate rarely
        # repeats another node's token after the same token (under 1 % merge
        # in docs/benchmarks.md), so it is measured on deep graphs.
        "GSD deep": Method("GSD deep", {**gsd, **DEEP_GRAPH, **WHOLE_TREES, **NO_LOOKUP}),
        "GSD deep no merge": Method("GSD deep no merge", {
            **gsd, **DEEP_GRAPH, **WHOLE_TREES, **NO_LOOKUP, "merge_context": -1}),
    }
    methods = [methods[kind] for kind in METHOD_KINDS
               if kind in set(args.methods) | {"plain"}]
    engines = [start_engine(m) for m in methods]
    for e in engines:
        e.wait_ready()
        # At every batch size measured, so that no method's first repeat
        # pays the one-off set-up of its shapes there (a bf16 GEMM builds
        # a oneDNN kernel at each new row count: 1.4-3 ms per weight).
        for batch in args.batch_sizes:
            e.run(**{**job, "batch": batch}, warmup=True)
    workloads = [(b, t) for t in args.temperatures for b in args.batch_sizes]
    runs: dict = {(w, m.name): [] for w in workloads for m in methods}
    with tqdm(total=args.repeats * len(workloads) * len(methods), desc="main run") as bar:
        for rep in range(args.repeats):
            for batch, temperature in workloads:
                order = engines[rep % len(engines):] + engines[:rep % len(engines)]
                for e in order:
                    time.sleep(SETTLE_S)
                    runs[(batch, temperature), e.method.name].append(e.run(
                        batch=batch, temperature=temperature, max_tokens=args.max_tokens,
                        static=args.static_batches))
                    bar.update()
    for e in engines:
        e.close()

    report = {"started": started, "machine": machine(), "target": args.target,
              "draft": args.draft, "dtype": dtype, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "prompts": [p[:2] for p in PROMPTS],
              "static_batches": args.static_batches, "compiled": args.compile,
              "gsd_config": gsd, "chain_sweep": sweep, "best_chain_k": best_k,
              "workloads": []}
    for batch, temperature in workloads:
        plain = runs[(batch, temperature), "plain"]
        entry = {"batch": batch, "temperature": temperature, "methods": {}}
        for m in methods:
            these = runs[(batch, temperature), m.name]
            s = summarize(m, these, plain)
            if temperature == 0:
                s["identical_to_plain"] = all(r["token_ids"] == p["token_ids"]
                                              for r, p in zip(these, plain))
            entry["methods"][m.name] = s
        report["workloads"].append(entry)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    plot(report, out / "speedup.png")
    print(markdown(report))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
