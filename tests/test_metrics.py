"""GSD counters: increments for the trip to the front end, Prometheus side."""

from __future__ import annotations

import prometheus_client

from vllm_gsd.metrics import GSDStats, PrometheusCounters, counter_names


def test_increments_are_what_grew_since_the_last_take():
    stats = GSDStats()
    stats.draft_tokens += 5
    stats.graphs += 1
    assert stats.take_increments() == {"draft_tokens": 5, "graphs": 1}
    assert stats.take_increments() == {}
    stats.draft_tokens += 2
    assert stats.take_increments() == {"draft_tokens": 2}
    assert stats.as_dict()["draft_tokens"] == 7
    assert set(stats.as_dict()) == set(counter_names())


def test_prometheus_counters_add_increments_per_engine_and_replace_older_ones():
    PrometheusCounters("old-model", [0])
    counters = PrometheusCounters("m", [0, 1])  # replaces, no duplicate error
    counters.record(1, {"accepted_tokens": 3})
    counters.record(1, {"accepted_tokens": 2, "graphs": 1})
    value = prometheus_client.REGISTRY.get_sample_value
    assert value("vllm:gsd_accepted_tokens_total", {"model_name": "m", "engine": "1"}) == 5
    assert value("vllm:gsd_accepted_tokens_total", {"model_name": "m", "engine": "0"}) == 0
    assert value("vllm:gsd_graphs_total", {"model_name": "m", "engine": "1"}) == 1
    assert value("vllm:gsd_graphs_total", {"model_name": "old-model", "engine": "0"}) is None
