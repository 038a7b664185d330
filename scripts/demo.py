"""Demo: GSD generation in vLLM on the bundled models, beside plain decoding.

    python scripts/demo.py [--draft PATH] [--max-tokens N]

Runs the same greedy prompts through plain vLLM and through vLLM with
{"method": "gsd"}, checks the outputs are token-identical, and prints
tokens/s, the speedup, the mean acceptance length (tokens per target pass)
and GSD's graph counters. The draft defaults to the 2-layer draft distilled
from the target (models/, assembled by scripts/prepare_models.py), with the
GSD settings scripts/benchmark.py uses. float32, so that plain and GSD
outputs can be compared bit for bit (docs/benchmarks.md has bfloat16 too).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import default_gsd_config  # noqa: E402
from prepare_models import DISTILLED_DRAFT_NAME, TARGET_NAME, default_out_dir  # noqa: E402

PROMPTS = [
    "The three primary colours are",
    "def count_words(text):",
    "List of fruits:\n1. apple\n2.",
    "Once upon a time",
    "Question: What is 12 plus 30?\nAnswer:",
    "SELECT name, age FROM users WHERE",
]


def run(model: str, speculative_config: dict | None, max_tokens: int):
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024,
              seed=0, disable_log_stats=False, speculative_config=speculative_config)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.generate(PROMPTS[:1], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in PROMPTS]
    seconds = time.perf_counter() - start
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    stats = None
    if speculative_config:
        from vllm_gsd.metrics import worker_stats
        stats = llm.collective_rpc(worker_stats)[0]
    llm.llm_engine.engine_core.shutdown()
    return outputs, seconds, metrics, stats


def main() -> None:
    models = default_out_dir()
    target = str(models / TARGET_NAME)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", default=str(models / DISTILLED_DRAFT_NAME),
                        help="draft model folder")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    spec = default_gsd_config(args.draft)

    plain, plain_s, _, _ = run(target, None, args.max_tokens)
    gsd, gsd_s, metrics, stats = run(target, spec, args.max_tokens)

    identical = all(a.outputs[0].token_ids == b.outputs[0].token_ids
                    for a, b in zip(plain, gsd))
    tokens = sum(len(o.outputs[0].token_ids) for o in plain)
    passes = metrics.get("vllm:spec_decode_num_drafts") or 1
    accepted = metrics.get("vllm:spec_decode_num_accepted_tokens") or 0
    print("\n=== vllm-gsd demo: batch 1, greedy, float32, "
          f"{len(PROMPTS)} prompts x {args.max_tokens} tokens ===")
    print(f"target: {target}\ndraft:  {args.draft}")
    print(f"GSD config: {spec}")
    print(f"{'':24}{'plain':>10}{'GSD':>10}")
    print(f"{'tokens/s':24}{tokens / plain_s:10.1f}{tokens / gsd_s:10.1f}")
    print(f"speedup over plain: {plain_s / gsd_s:.2f}x")
    print(f"mean acceptance length (tokens per target pass): {1 + accepted / passes:.2f}")
    print(f"GSD counters: {stats}")
    print(f"outputs token-identical to plain decoding: {identical}")
    print(f"sample: {PROMPTS[0]!r} -> {gsd[0].outputs[0].text!r}")
    if not identical:
        sys.exit("GSD output differs from plain decoding")


if __name__ == "__main__":
    main()
