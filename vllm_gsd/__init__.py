"""vllm-gsd: Graph-structured Speculative Decoding (arXiv 2407.16207) for vLLM.

The `vllm.general_plugins` entry point calls `register()` in every vLLM
process (front end, engine core, workers, Ray actors).
"""

__version__ = "0.1.0"


def register() -> None:
    """Makes {"method": "gsd", ...} a speculative method. Idempotent."""
    from vllm_gsd.patches import apply_all

    apply_all()
