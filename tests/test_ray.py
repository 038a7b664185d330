"""GSD under vLLM's Ray executor (RayExecutorV2), on CPU.

vLLM 0.32 refuses Ray on its CPU platform only because the platform names no
Ray device (`CpuPlatform.ray_device_key` is empty). Here a local Ray cluster
offers fake GPUs and the CPU platform claims them, in this process and, via
tests/ray_hooks.py, in every Ray worker; the workers still compute on the CPU.
What is tested is the plugin's side: the entry point installs GSD in vLLM's
Ray actors, the GSD config reaches them intact, and trees are verified there
exactly as without Ray (at TP=2, all ranks verify rank 0's trees).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray executor tests need `pip install ray`")

from conftest import gsd_stats, running_llm
from test_config import engine_config

# plain_tp2 and tp_models are fixtures, used by name.
from test_tensor_parallel import (  # noqa: F401
    all_ranks_stats,
    generate,
    plain_tp2,
    rank_1_drafts_chains,
    tp_models,
)

TESTS = Path(__file__).resolve().parent
FAKE_GPUS = 2  # enough for TP=2
# vLLM waits up to 30 minutes for a placement group; a test whose fake GPUs are
# still reserved should fail quickly instead.
PLACEMENT_GROUP_WAIT_S = 60
GSD_FIXED = {"method": "gsd", "top_k": 4, "sibling_ratio": 0.0,
             "max_verify_nodes": 8, "budget": "fixed"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A private local Ray cluster whose fake GPUs the CPU platform claims;
    shut down however the module's tests end."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor import ray_utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CpuPlatform, "ray_device_key", "GPU")
        patch.setattr(ray_utils, "PG_WAIT_TIMEOUT", PLACEMENT_GROUP_WAIT_S)
        # Ray refuses more GPUs than an inherited CUDA_VISIBLE_DEVICES lists
        # (ray/_private/resource_and_label_spec.py); it sets the variable in
        # each worker itself, which vLLM's CPU worker ignores.
        patch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=2, num_gpus=FAKE_GPUS,
                 _node_ip_address="127.0.0.1", include_dashboard=False,
                 object_store_memory=100 * 1024 * 1024,
                 runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)},
                              "worker_process_setup_hook":
                                  "ray_hooks.place_cpu_workers_on_fake_gpus"})
        try:
            yield
        finally:
            ray.shutdown()


@ray.remote
class PluginProbe:
    """A bare Ray actor: vLLM's plugin loading is all that installs GSD here."""

    def load_plugins_and_read(self, vllm_config) -> dict:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.plugins import load_general_plugins

        def gsd_patched() -> bool:
            return getattr(EngineArgs.create_speculative_config,
                           "_vllm_gsd_patched", False)

        patched_before = gsd_patched()
        load_general_plugins()
        spec = vllm_config.speculative_config
        return {"patched_before": patched_before, "patched_after": gsd_patched(),
                "method": spec.method, "model": spec.model,
                "num_speculative_tokens": spec.num_speculative_tokens,
                "gsd": spec.gsd.to_dict()}


def test_plugin_loads_in_a_ray_actor_and_the_gsd_config_arrives_intact(
        ray_cluster, target, weak_draft):
    """In a fresh Ray actor, vLLM's load_general_plugins() installs GSD through
    the entry point, and a VllmConfig built in this process arrives with its
    GSD fields (and the custom_class proposer they became) unchanged."""
    config = engine_config(target, {**GSD_FIXED, "model": weak_draft})
    spec = config.speculative_config
    probe = PluginProbe.remote()
    try:
        seen = ray.get(probe.load_plugins_and_read.remote(config))
    finally:
        ray.kill(probe)
    assert seen == {"patched_before": False, "patched_after": True,
                    "method": spec.method, "model": spec.model,
                    "num_speculative_tokens": spec.num_speculative_tokens,
                    "gsd": spec.gsd.to_dict()}


@pytest.fixture(scope="module")
def plain_tp1(target):
    """Plain decoding, engine and worker in this process (no Ray)."""
    with running_llm(target) as llm:
        outputs = generate(llm)
    return outputs


@contextmanager
def running_llm_on_ray(target: str, speculative_config: dict, **kwargs):
    """running_llm with vLLM's Ray executor. Afterwards it also frees the
    engine's placement group: vLLM 0.32 creates one per engine
    (ray_utils.initialize_ray_cluster) but RayExecutorV2.shutdown only kills
    the actors, so the next engine in this Ray session would wait for fake
    GPUs that stay reserved."""
    placement_group = None
    try:
        with running_llm(target, speculative_config,
                         distributed_executor_backend="ray", **kwargs) as llm:
            placement_group = llm.llm_engine.vllm_config.parallel_config.placement_group
            assert executor_class(llm) == "RayExecutorV2"
            yield llm
    finally:
        if placement_group is not None:
            ray.util.remove_placement_group(placement_group)


def executor_class(llm) -> str:
    """The engine's executor (the engine core runs in this process)."""
    return type(llm.llm_engine.engine_core.engine_core.model_executor).__name__


@pytest.mark.slow
def test_gsd_over_ray_at_tp1_equals_plain(ray_cluster, target, weak_draft, plain_tp1):
    """TP=1, the worker a Ray actor: GSD's greedy tokens equal plain vLLM's
    (in-process, no Ray), and the worker's counters show verified trees."""
    with running_llm_on_ray(target, {**GSD_FIXED, "model": weak_draft}) as llm:
        outputs = generate(llm)
        stats = gsd_stats(llm)
    print("Ray TP=1 stats:", stats)
    assert outputs == plain_tp1
    assert stats["verify_steps"] > 0 and stats["tree_nodes"] > 0
    assert stats["accepted_tokens"] > 0


@pytest.mark.slow
def test_gsd_over_ray_at_tp2_equals_plain_at_tp2(ray_cluster, tp_models, plain_tp2):
    """TP=2, each rank a Ray actor: output equals plain TP=2 (vLLM's mp
    executor), and both ranks verify rank 0's trees even where rank 1 would
    draft chains of its own."""
    target, draft = tp_models
    with running_llm_on_ray(target, {**GSD_FIXED, "model": draft},
                            tensor_parallel_size=2) as llm:
        llm.collective_rpc(rank_1_drafts_chains)
        outputs = generate(llm)
        stats = sorted(llm.collective_rpc(all_ranks_stats), key=lambda s: s["rank"])
    print("Ray TP=2 rank stats:", stats)
    assert outputs == plain_tp2
    rank_0, rank_1 = stats
    assert rank_0["verify_steps"] > 0 and rank_0["off_first_branch_accepts"] > 0
    assert rank_1["tree_nodes"] < rank_0["tree_nodes"]
    assert rank_1["accepted_tokens"] == rank_0["accepted_tokens"]
