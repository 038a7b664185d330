"""Shared fixtures: the bundled models and vLLM engines on this CPU.

Engines run in float32 with enforce_eager (greedy outputs are bit-stable in
float32, see shared/models/README.md) and, unless a test needs the
multi-process path, with the engine core in this process so one engine per
test module is cheap to reuse.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
# collective_rpc with a function (vllm_gsd.metrics.worker_stats) needs pickle.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """Builds (or reuses) the target and the 12-layer draft."""
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_models.py")],
        check=True, capture_output=True, text=True).stdout.split()
    return Path(out[0]).parent


@pytest.fixture(scope="session")
def target(model_dir: Path) -> str:
    return str(model_dir / "smollm2-135m")


@pytest.fixture(scope="session")
def weak_draft(model_dir: Path) -> str:
    return str(model_dir / "smollm2-135m-draft-12l")


@pytest.fixture(scope="session")
def distilled_draft(model_dir: Path) -> str:
    """The shipped 2-layer draft: what users run, and cheap to draft with."""
    return str(model_dir / "smollm2-135m-draft-distilled")


ENGINE_DEFAULTS = dict(dtype="float32", enforce_eager=True, max_model_len=1024,
                       seed=0, disable_log_stats=False)


@contextmanager
def running_llm(target: str, speculative_config: dict | None = None, **kwargs):
    """An engine, shut down however the test ends (an in-process engine left
    running breaks the next one's distributed state)."""
    from vllm import LLM

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = kwargs.pop(
        "multiprocessing", "0")
    llm = LLM(model=target, speculative_config=speculative_config,
              **{**ENGINE_DEFAULTS, **kwargs})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def draft_copy(draft: str, folder: Path, truncate_weights: bool = False) -> str:
    """`draft`'s folder with every file linked except the weights, which the
    test writes; `truncate_weights` writes them cut short at 1 MiB."""
    for file in os.listdir(draft):
        if not file.endswith(".safetensors"):
            os.symlink(os.path.join(draft, file), folder / file)
    if truncate_weights:
        with open(os.path.join(draft, "model.safetensors"), "rb") as whole:
            (folder / "model.safetensors").write_bytes(whole.read(1 << 20))
    return str(folder)


def gsd_stats(llm) -> dict:
    from vllm_gsd.metrics import worker_stats

    return llm.collective_rpc(worker_stats)[0]
