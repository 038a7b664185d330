"""scripts/distill_draft.py's data cache: a shorter run extends to a longer one.

The target is replaced by a fake `vllm.LLM` whose output depends only on the
prompt, the temperature and the request's seed, which is what the script
relies on from vLLM (per-request seeds make outputs independent of batching).
"""

from __future__ import annotations

import hashlib
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import vllm

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import distill_draft  # noqa: E402

TOP_K = 3


class FakeTarget:
    """Writes 1-20 tokens per request, each with TOP_K ranked log-probs, all
    drawn from a hash of (prompt, temperature, seed)."""

    calls: list[int] = []

    def __init__(self, **kwargs):
        pass

    def get_tokenizer(self):
        return SimpleNamespace(apply_chat_template=lambda messages, **_: repr(messages))

    def generate(self, texts, params, use_tqdm=False):
        FakeTarget.calls.append(len(texts))
        return [self._one(text, p) for text, p in zip(texts, params, strict=True)]

    @staticmethod
    def _one(text, params):
        digest = hashlib.sha256(f"{text}|{params.temperature}|{params.seed}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        n = int(rng.integers(1, min(20, params.max_tokens) + 1))
        tokens = rng.integers(0, 1000, n).tolist()
        logprobs = [{int(t): SimpleNamespace(rank=r + 1, logprob=-float(r))
                     for r, t in enumerate(rng.choice(1000, TOP_K, replace=False))}
                    for _ in range(n)]
        return SimpleNamespace(prompt_token_ids=[len(text) % 97, 1],
                               outputs=[SimpleNamespace(token_ids=tokens, logprobs=logprobs)])

    @property
    def llm_engine(self):
        return SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: None))


@pytest.fixture
def fake_target(monkeypatch):
    monkeypatch.setattr(vllm, "LLM", FakeTarget)
    FakeTarget.calls.clear()


def run(tmp_path, num_tokens: int, gen_batch: int):
    args = distill_draft.parse_args([
        "--target", str(tmp_path), "--out", str(tmp_path), "--num-tokens", str(num_tokens),
        "--top-k", str(TOP_K), "--gen-batch", str(gen_batch), "--max-new-tokens", "20"])
    return distill_draft.load_or_generate(args)


def first_sequences(data, n: int) -> dict:
    tokens_end, labels_end = data.seq_offsets[n], data.label_offsets[n]
    return {"tokens": data.tokens[:tokens_end], "seq_offsets": data.seq_offsets[:n + 1],
            "prompt_lens": data.prompt_lens[:n], "prompt_ids": data.prompt_ids[:n],
            "temperatures": data.temperatures[:n], "topk_ids": data.topk_ids[:labels_end],
            "topk_logprobs": data.topk_logprobs[:labels_end]}


def test_a_longer_run_continues_the_cache_with_a_fresh_runs_sequences(tmp_path, fake_target):
    fresh = run(tmp_path / "fresh", 3000, gen_batch=64)
    fresh_requests = sum(FakeTarget.calls)
    short = run(tmp_path / "grown", 1200, gen_batch=16)
    short_requests = sum(FakeTarget.calls) - fresh_requests
    grown = run(tmp_path / "grown", 3000, gen_batch=64)
    grown_requests = sum(FakeTarget.calls) - fresh_requests - short_requests
    assert len(short.topk_ids) < 3000 <= len(grown.topk_ids)
    # The extension asked only for the jobs after the short run's.
    assert grown.meta["jobs"] == short.meta["jobs"] + grown_requests
    # Both runs are prefixes of one job sequence; batching decides only
    # where each stops.
    common = min(fresh.num_seqs, grown.num_seqs)
    assert common > short.num_seqs
    for name, expected in first_sequences(fresh, common).items():
        np.testing.assert_array_equal(first_sequences(grown, common)[name], expected,
                                      err_msg=name)
    # Reloaded from the cache as it is, with nothing generated.
    calls = len(FakeTarget.calls)
    again = run(tmp_path / "grown", 3000, gen_batch=64)
    assert len(FakeTarget.calls) == calls
    np.testing.assert_array_equal(again.tokens, grown.tokens)


def test_a_cache_of_other_settings_is_regenerated_not_extended(tmp_path, fake_target):
    run(tmp_path, 1200, gen_batch=16)
    args = distill_draft.parse_args([
        "--target", str(tmp_path), "--out", str(tmp_path), "--num-tokens", "3000",
        "--top-k", str(TOP_K), "--max-new-tokens", "20", "--temperature", "0.5"])
    data = distill_draft.load_or_generate(args)
    assert data.meta["temperature"] == 0.5
    assert set(np.unique(data.temperatures)) <= {0.0, np.float32(0.5)}


def test_a_cache_without_a_job_count_is_continued_when_it_matches_the_schedule(
        tmp_path, fake_target):
    fresh = run(tmp_path / "fresh", 3000, gen_batch=64)
    short = run(tmp_path / "old", 1200, gen_batch=16)
    path = tmp_path / "old" / distill_draft.DATA_FILE
    del short.meta["jobs"]  # as caches were written before the job count
    short.save(path)
    grown = run(tmp_path / "old", 3000, gen_batch=64)
    assert grown.num_seqs > short.num_seqs
    common = min(fresh.num_seqs, grown.num_seqs)
    np.testing.assert_array_equal(first_sequences(grown, common)["tokens"],
                                  first_sequences(fresh, common)["tokens"])
    # A cache whose sequences are not the schedule's first jobs is redone.
    redone_short = run(tmp_path / "odd", 1200, gen_batch=16)
    del redone_short.meta["jobs"]
    redone_short.prompt_ids[0] += 1
    redone_short.save(tmp_path / "odd" / distill_draft.DATA_FILE)
    redone = run(tmp_path / "odd", 3000, gen_batch=64)
    np.testing.assert_array_equal(first_sequences(redone, common)["tokens"],
                                  first_sequences(fresh, common)["tokens"])
    assert redone.prompt_ids[0] == fresh.prompt_ids[0]
