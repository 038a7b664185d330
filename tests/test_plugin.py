"""The plugin reaches every vLLM process through its entry point."""

from __future__ import annotations

import importlib.metadata

import pytest

from conftest import gsd_stats, running_llm


def test_entry_point_registers_gsd_in_the_vllm_plugin_group():
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert [p.value for p in plugins if p.name == "gsd"] == ["vllm_gsd:register"]


def test_register_is_idempotent():
    import vllm_gsd
    from vllm.engine.arg_utils import EngineArgs

    vllm_gsd.register()
    first = EngineArgs.create_speculative_config
    vllm_gsd.register()
    assert EngineArgs.create_speculative_config is first


@pytest.mark.slow
def test_llm_with_engine_core_in_its_own_process_drafts_with_gsd(target):
    """The engine core and its worker are separate processes here: the config
    crosses a pickle, and the proposer and patches must be installed there by
    the entry point alone. GSD's counters reach LLM.get_metrics() from there."""
    from vllm import SamplingParams

    with running_llm(target, {"method": "gsd", "model": target, "max_verify_nodes": 4},
                     multiprocessing="1") as llm:
        out = llm.generate(["The three primary colours are"],
                           SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
        stats = gsd_stats(llm)
        spec = llm.llm_engine.vllm_config.speculative_config
        metrics = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:gsd_")}
    assert len(out[0].outputs[0].token_ids) == 16
    assert spec.model == "vllm_gsd.proposer.GSDProposer" and spec.gsd.max_verify_nodes == 4
    assert stats["draft_forward_passes"] > 0 and stats["accepted_tokens"] > 0
    assert {name: metrics[f"vllm:gsd_{name}"] for name in stats} == stats
