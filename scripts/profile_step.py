"""Where an engine step's time goes: plain vLLM and GSD, T=0.

    python scripts/profile_step.py [--dtype float32|bfloat16] [--batch N] [--draft DIR] [--gsd JSON]

Runs the benchmark's prompts (scripts/benchmark.py) in batches of N (default
1; the prompts repeat to fill the last batch) through plain vLLM, then GSD with the benchmark's settings, each in this process
with its engine core inside it, and prints milliseconds per engine step
spent in: the target pass (`execute_model`), its attention kernels (stock
calls, and everything in the patched forward including branch replay),
sampling and drafting (`sample_tokens`), drafting (`propose`), the draft's
forward passes, and verification. Timers are `time.perf_counter` wrappers
around those entry points, installed before the engine starts.

For GSD it then prints the decode steps grouped by the tree they verified
(its deepest node's depth and its node count over the batch; (0, 0) is a
step without one): their median time, the tokens they produced and the
milliseconds per token, which says which trees the budget's choices pay
for beside the plain steps of the same run.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the timers live in this process

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import PROMPTS, cycled, default_gsd_config  # noqa: E402
from prepare_models import DISTILLED_DRAFT_NAME, TARGET_NAME, default_out_dir  # noqa: E402

seconds: collections.Counter = collections.Counter()
calls: collections.Counter = collections.Counter()

STEP = "target pass (execute_model)"
ATTENTION = "  attention: all (stock + replay)"
STOCK = "    attention: stock kernel calls"
SAMPLE = "sampling, verification, drafting"
PROPOSE = "  drafting (propose)"
DRAFT_FORWARD = "    draft forward passes"
VERIFY = "  verification"
LABELS = (STEP, ATTENTION, STOCK, SAMPLE, PROPOSE, DRAFT_FORWARD, VERIFY)


def add_timer(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - start
            calls[label] += 1
    setattr(owner, name, timed)


step_trees: list[tuple[tuple[int, int], int, float]] = []
"""Per GSD decode step: (deepest verified depth, verified nodes), tokens
produced, milliseconds from the end of the last step's drafting to the end
of its own."""


def add_tree_shape_log(proposer_class) -> None:
    """Logs `step_trees`: a step verifies the trees the propose call before
    it returned, and its own propose call receives the tokens it produced.
    A step is a decode step when the engine says so to the budget
    (`target_step_started` gets no shape for a step with prompt tokens)."""
    original_propose = proposer_class.propose
    original_started = proposer_class.target_step_started
    last: dict = {"shape": None, "time": None, "decode": False}

    @functools.wraps(original_started)
    def target_step_started(self, shape):
        last["decode"] = shape is not None
        return original_started(self, shape)

    @functools.wraps(original_propose)
    def propose(self, sampled_token_ids, *args, **kwargs):
        drafts = original_propose(self, sampled_token_ids, *args, **kwargs)
        now = time.perf_counter()
        if last["shape"] is not None and last["decode"]:
            step_trees.append((last["shape"], sum(map(len, sampled_token_ids)),
                               1000 * (now - last["time"])))
        trees = self.trees.values()
        last["shape"] = (max((max(tree.depths) for tree in trees), default=0),
                         sum(map(len, trees)))
        last["time"] = now
        return drafts
    proposer_class.target_step_started = target_step_started
    proposer_class.propose = propose


def print_tree_shapes() -> None:
    by_shape = collections.defaultdict(list)
    for shape, tokens, ms in step_trees:
        by_shape[shape].append((tokens, ms))
    print("steps by verified tree (depth, nodes): steps, median ms, tokens/step, ms/token")
    for shape, steps in sorted(by_shape.items()):
        median_ms = statistics.median(ms for _, ms in steps)
        tokens = statistics.mean(tokens for tokens, _ in steps)
        print(f"  {str(shape):10s} {len(steps):5d} {median_ms:7.1f} {tokens:6.2f} "
              f"{median_ms / tokens:7.1f}")


def add_attention_timers() -> None:
    """Times every patched backend forward, and the stock kernel calls inside
    it; the difference is branch replay and the fix-up stash."""
    import importlib

    from vllm_gsd import patches
    from vllm_gsd.attention import tree_forward

    patches.apply_all()
    for path in patches._ATTENTION_IMPLS:
        module_name, class_name = path.rsplit(".", 1)
        try:
            impl = getattr(importlib.import_module(module_name), class_name)
        except ImportError:
            continue
        stock = impl.forward.__wrapped__

        def stock_timed(*args, _stock=stock, **kwargs):
            start = time.perf_counter()
            try:
                return _stock(*args, **kwargs)
            finally:
                seconds[STOCK] += time.perf_counter() - start

        def forward(self, *args, _stock_timed=stock_timed, **kwargs):
            start = time.perf_counter()
            try:
                return tree_forward(_stock_timed, self, *args, **kwargs)
            finally:
                seconds[ATTENTION] += time.perf_counter() - start
        forward._vllm_gsd_patched = True  # keeps patches.apply_all from re-wrapping
        impl.forward = forward


def main() -> None:
    models = default_out_dir()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--target", default=str(models / TARGET_NAME))
    parser.add_argument("--draft", default=str(models / DISTILLED_DRAFT_NAME))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--gsd", default="{}", help="JSON overriding GSD settings")
    parser.add_argument("--batch", type=int, default=1, help="requests per batch")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_gsd.draft_model import TreeDraftModel
    from vllm_gsd.proposer import GSDProposer
    from vllm_gsd.sampler import GSDRejectionSampler

    add_attention_timers()
    add_timer(GPUModelRunner, "execute_model", STEP)
    add_timer(GPUModelRunner, "sample_tokens", SAMPLE)
    add_timer(GSDProposer, "propose", PROPOSE)
    add_timer(TreeDraftModel, "forward", DRAFT_FORWARD)
    add_timer(GSDRejectionSampler, "forward", VERIFY)
    add_tree_shape_log(GSDProposer)

    gsd = {**default_gsd_config(args.draft), **json.loads(args.gsd)}
    for name, spec in (("plain", None), ("GSD", gsd)):
        llm = LLM(model=args.target, dtype=args.dtype, enforce_eager=True,
                  max_model_len=1024, seed=0, speculative_config=spec)
        tokenizer = llm.get_tokenizer()
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
                   if chat else text for _, text, chat in PROMPTS]
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
        seconds.clear()
        calls.clear()
        step_trees.clear()
        start = time.perf_counter()
        batches = -(-len(prompts) // args.batch)
        queue = cycled(prompts, batches * args.batch)
        tokens = sum(len(output.outputs[0].token_ids)
                     for i in range(0, len(queue), args.batch)
                     for output in llm.generate(queue[i:i + args.batch], params,
                                                use_tqdm=False))
        wall = time.perf_counter() - start
        steps = calls[STEP]
        print(f"\n=== {name}, {args.dtype}, batch {args.batch}: {tokens} tokens in {steps} steps, "
              f"{tokens / wall:.1f} tok/s, {1000 * wall / steps:.1f} ms per step")
        for label in LABELS:
            if seconds[label]:
                print(f"{label:45s} {1000 * seconds[label] / steps:7.2f} ms/step")
        if step_trees:
            print_tree_shapes()
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


if __name__ == "__main__":
    main()
