"""scripts/gpu_cost_curve.py: the timed tree pass computes what verification
does, and the projection reads costs as vLLM would run the passes.

The timings themselves need a GPU (docs/benchmarks.md, "GPU cost curves");
these check, on the CPU, the parts a wrong projection would come from.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_cost_curve  # noqa: E402


def test_tree_pass_gives_each_node_its_paths_logits():
    assert gpu_cost_curve.check_tree_pass("cpu") < gpu_cost_curve.CHECK_TOLERANCE


@pytest.mark.parametrize("wrong", ["positions by row", "causal mask"])
def test_tree_pass_check_catches_a_wrong_layout(monkeypatch, wrong):
    right = gpu_cost_curve.tree_rows

    def wrong_rows(tree):
        depths, mask = right(tree)
        if wrong == "positions by row":
            return np.arange(len(depths)), mask
        return depths, np.tril(np.ones_like(mask))

    monkeypatch.setattr(gpu_cost_curve, "tree_rows", wrong_rows)
    assert gpu_cost_curve.check_tree_pass("cpu") > 1e-2


def test_a_pass_costs_its_padded_cuda_graph_size():
    # Odd sizes run other GEMM kernels than the padded graphs vLLM replays:
    # a 3-row pass costs the 4-row graph, and the 3-row measurement is unused.
    curve = {"1": {"ms": 10.0}, "2": {"ms": 11.0}, "3": {"ms": 50.0}, "4": {"ms": 12.0},
             "8": {"ms": 16.0}}
    assert gpu_cost_curve.pass_ms(curve, 1, 3) == 12.0
    assert gpu_cost_curve.pass_ms(curve, 1, 2.5) == 12.0
    assert gpu_cost_curve.pass_ms(curve, 1, 6) == 16.0  # 6 pads to 8
    assert gpu_cost_curve.pass_ms(curve, 2, 3) == 12.0  # 6 tokens pad to 8: 2 requests x 4 rows
    with pytest.raises(ValueError):
        gpu_cost_curve.pass_ms(curve, 1, 9)


# A verify pass of any size up to 64 costs what one token does, the draft is
# free, and each replay wave costs 1 ms.
FLAT = {str(r): {"ms": 10.0} for r in (1, 2, 4, 8, 16, 32, 64)}
COSTS = {"curves": {"target": {"1": FLAT}, "draft": {"1": {k: {"ms": 0.0} for k in FLAT}}},
         "waves": {"target": {"1x33": {"0": 10.0, "16": 26.0}}}}


def measured(tau, verified, branches=0.0):
    return {"tau": tau, "draft_passes_per_step": 1.0, "draft_tokens_per_request_step": 1.0,
            "verified_per_request_step": verified,
            "replayed_branches_per_request_step": branches}


def test_projection_picks_each_methods_best_configuration():
    # The deepest tree, with the largest τ, must win.
    acceptance = {"rows": [
        {"budget": n, "methods": {"vLLM chain": measured(1.3, n), "GSD tree": measured(tau, n)}}
        for n, tau in ((1, 1.3), (8, 1.8), (32, 2.0))]}
    best = gpu_cost_curve.project(COSTS, acceptance, "target", "draft", 1, host_ms=0.0)
    assert best["GSD tree"]["label"] == "N=32"
    assert best["GSD tree"]["speedup"] == pytest.approx(2.0)
    assert best["vLLM chain"]["speedup"] == pytest.approx(1.3)
    slower = gpu_cost_curve.project(COSTS, acceptance, "target", "draft", 1, host_ms=10.0)
    assert slower["GSD tree"]["speedup"] == pytest.approx(1.0)


def test_branch_replay_charges_each_replayed_branch_a_wave():
    # 20 replayed branches at 1 ms each turn the 32-node tree's 2.0 tokens
    # per 10 ms into 2.0 per 30 ms; the 8-node tree with 2 branches wins.
    acceptance = {"rows": [
        {"budget": n, "methods": {"vLLM chain": measured(1.3, n),
                                  "GSD tree": measured(tau, n, branches)}}
        for n, tau, branches in ((1, 1.3, 0.0), (8, 1.8, 2.0), (32, 2.0, 20.0))]}
    best = gpu_cost_curve.project(COSTS, acceptance, "target", "draft", 1, 0.0, replay=True)
    assert best["GSD tree"]["label"] == "N=8"
    assert best["GSD tree"]["speedup"] == pytest.approx(1.8 * 10 / 12)
    assert best["vLLM chain"]["speedup"] == pytest.approx(1.3)  # chains replay nothing
