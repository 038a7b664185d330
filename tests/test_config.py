"""Bad speculative configs are rejected before any model loads, each with a
message that names the field and what is allowed."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import vllm_gsd
from conftest import REPO, draft_copy
from vllm_gsd.config import GSDConfig, GSDConfigError

vllm_gsd.register()


def engine_config(target: str, speculative_config: dict, **engine_kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=target, dtype="float32", enforce_eager=True,
                      max_model_len=512, speculative_config=speculative_config,
                      **engine_kwargs).create_engine_config()


@pytest.fixture(scope="module")
def other_vocab_draft(weak_draft, tmp_path_factory):
    """The weak draft's config with a different vocab size (no weights needed:
    validation must fail before loading)."""
    folder = tmp_path_factory.mktemp("other_vocab")
    config = json.load(open(f"{weak_draft}/config.json"))
    config["vocab_size"] = 32000
    json.dump(config, open(folder / "config.json", "w"))
    return str(folder)


@pytest.fixture(scope="module")
def other_architecture_draft(weak_draft, tmp_path_factory):
    folder = tmp_path_factory.mktemp("other_arch")
    shutil.copy(f"{weak_draft}/config.json", folder / "config.json")
    config = json.load(open(folder / "config.json"))
    config["architectures"] = ["Qwen2ForCausalLM"]
    json.dump(config, open(folder / "config.json", "w"))
    return str(folder)


BAD_FIELDS = [
    ({"gsd_branches": 4}, r"unknown key\(s\) \['gsd_branches'\]"),
    ({"top_k": 0}, r"top_k: 0 is out of range; allowed 1 to 64"),
    ({"top_k": 2.5}, r"top_k: expected int"),
    ({"merge_context": -2}, r"merge_context: -2 is out of range; allowed -1"),
    ({"sibling_ratio": 1.5}, r"sibling_ratio: 1.5 is out of range"),
    ({"min_node_prob": -0.1}, r"min_node_prob: -0.1 is out of range"),
    ({"max_depth": 0}, r"max_depth: 0 is out of range"),
    ({"max_verify_nodes": 129}, r"max_verify_nodes: 129 is out of range; allowed 1 to 128"),
    ({"max_draft_nodes": True}, r"max_draft_nodes: expected int, got True"),
    ({"draft_vocab_size": 3}, r"draft_vocab_size: 3 is smaller than top_k \(4\)"),
    ({"budget": "auto"}, r"budget: 'auto' is not one of \[.adaptive., .fixed.\]"),
    ({"max_verify_nodes": 8, "num_speculative_tokens": 4},
     r"num_speculative_tokens \(4\) and max_verify_nodes \(8\) disagree"),
]


@pytest.mark.parametrize("fields, message", BAD_FIELDS)
def test_bad_field_is_rejected_with_its_name(target, fields, message):
    with pytest.raises(GSDConfigError, match=message):
        engine_config(target, {"method": "gsd", "model": target, **fields})


def test_missing_draft_model_is_rejected(target):
    with pytest.raises(GSDConfigError, match="needs 'model'"):
        engine_config(target, {"method": "gsd"})


def test_draft_path_that_is_no_model_folder_is_rejected(target, tmp_path):
    with pytest.raises(GSDConfigError, match="is not a local model folder"):
        engine_config(target, {"method": "gsd", "model": str(tmp_path)})


def test_draft_with_another_vocabulary_is_rejected(target, other_vocab_draft):
    with pytest.raises(GSDConfigError,
                       match=r"vocab_size \(32000\) differs from the target's \(49152\)"):
        engine_config(target, {"method": "gsd", "model": other_vocab_draft})


def test_reduced_draft_vocab_without_token_counts_is_rejected(target):
    with pytest.raises(GSDConfigError, match="draft_vocab_size needs gsd_token_counts.npy"):
        engine_config(target, {"method": "gsd", "model": target, "draft_vocab_size": 8192})


def test_draft_of_unsupported_architecture_is_rejected(target, other_architecture_draft):
    with pytest.raises(GSDConfigError, match="Qwen2ForCausalLM.*not supported"):
        engine_config(target, {"method": "gsd", "model": other_architecture_draft})


def test_draft_with_truncated_weights_is_rejected(target, weak_draft, tmp_path):
    draft = draft_copy(weak_draft, tmp_path, truncate_weights=True)
    with pytest.raises(GSDConfigError, match=r"model.safetensors' cannot be read: .*header"):
        engine_config(target, {"method": "gsd", "model": draft})


def test_draft_whose_weights_disagree_with_its_config_is_rejected(target, weak_draft,
                                                                  tmp_path):
    """A missing tensor, or a config.json with another MLP width than the
    weights (as a half-finished conversion leaves them): the error names the
    tensor."""
    from safetensors.torch import load_file, save_file

    draft = draft_copy(weak_draft, tmp_path)
    weights = load_file(f"{weak_draft}/model.safetensors")
    del weights["model.layers.11.mlp.down_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(GSDConfigError,
                       match=r"do not match its config.json: "
                             r"layers.11.mlp.down_proj.weight missing$"):
        engine_config(target, {"method": "gsd", "model": draft})
    config = json.load(open(f"{weak_draft}/config.json"))
    os.unlink(tmp_path / "config.json")
    json.dump({**config, "intermediate_size": 1024}, open(tmp_path / "config.json", "w"))
    with pytest.raises(GSDConfigError,
                       match=r"layers.0.mlp.gate_proj.weight has shape \(1536, 576\), "
                             r"config.json implies \(1024, 576\).*\(and 33 more\)"):
        engine_config(target, {"method": "gsd", "model": draft})


@pytest.mark.parametrize("engine_kwargs, message", [
    ({"async_scheduling": True}, "needs synchronous scheduling"),
    ({"logprobs_mode": "processed_logprobs"}, "logprobs_mode"),
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size > 1"),
])
def test_incompatible_engine_option_is_rejected(target, engine_kwargs, message):
    with pytest.raises(GSDConfigError, match=message):
        engine_config(target, {"method": "gsd", "model": target}, **engine_kwargs)


def test_v2_model_runner_is_rejected(target, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    # Raised inside VllmConfig's validation, so pydantic wraps it (a
    # ValidationError is a ValueError, as GSDConfigError is).
    with pytest.raises(ValueError, match="runs on vLLM's V1 model runner"):
        engine_config(target, {"method": "gsd", "model": target})


@pytest.mark.parametrize("gsd, mode, want", [
    (True, "FULL_AND_PIECEWISE", "PIECEWISE"),
    (True, "FULL", "PIECEWISE"),
    (True, "FULL_DECODE_ONLY", "PIECEWISE"),
    (True, "PIECEWISE", "PIECEWISE"),
    (True, "NONE", "NONE"),
    (False, "FULL_AND_PIECEWISE", "FULL_AND_PIECEWISE"),
])
def test_full_cuda_graphs_become_piecewise_under_gsd(gsd, mode, want):
    """A full CUDA graph would replay a tree step's attention without branch
    replay. This CPU resolves every mode to NONE later in VllmConfig, so the
    step that decides it on a GPU is called here on its own."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig, VllmConfig
    from vllm.config.compilation import CUDAGraphMode

    spec = SimpleNamespace(uses_dynamic_speculative_decoding=lambda: False)
    if gsd:
        spec.gsd = GSDConfig(model="/draft")
    config = SimpleNamespace(
        speculative_config=spec, use_v2_model_runner=False,
        compilation_config=CompilationConfig(cudagraph_mode=CUDAGraphMode[mode]))
    VllmConfig._maybe_override_dynamic_sd_cudagraph_mode(config)
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode[want]


def test_valid_config_becomes_the_custom_proposer_with_gsd_attached(target):
    config = engine_config(target, {"method": "gsd", "model": target, "top_k": 3,
                                    "num_speculative_tokens": 10})
    spec = config.speculative_config
    assert spec.method == "custom_class"
    assert spec.model == "vllm_gsd.proposer.GSDProposer"
    assert spec.num_speculative_tokens == 10
    assert spec.gsd == GSDConfig(model=target, top_k=3, max_verify_nodes=10)


def test_other_methods_are_left_to_vllm(target):
    config = engine_config(target, {"method": "ngram", "num_speculative_tokens": 3,
                                    "prompt_lookup_max": 3})
    assert config.speculative_config.method == "ngram"
    assert not hasattr(config.speculative_config, "gsd")


def test_defaults_are_documented_and_valid():
    config = GSDConfig(model="/draft")
    config._validate()
    for name in GSDConfig.field_names():
        assert f"`{name}`" in (REPO / "README.md").read_text(), name
