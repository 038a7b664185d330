"""GSDConfig: every knob a user can set, with its default, meaning and range.

Users write the knobs into vLLM's own speculative config::

    LLM(model=T, speculative_config={"method": "gsd", "model": D, "top_k": 4})
    vllm serve T --speculative-config '{"method": "gsd", "model": "D"}'

`GSDConfig.from_user_dict` validates that dict before any model loads and names
the offending field and what is allowed, in the style of vLLM's own config
errors. This module imports nothing from vLLM so it can be tested on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# vLLM's rejection sampler caps drafts per request at 128 (MAX_SPEC_LEN in
# vllm/v1/sample/rejection_sampler.py); the flattened tree travels as drafts.
MAX_VERIFY_NODES = 128
BUDGETS = ("adaptive", "fixed")


class GSDConfigError(ValueError):
    """A speculative_config for method "gsd" that cannot be honoured."""


@dataclass(frozen=True)
class GSDConfig:
    model: str
    """Path of the draft model: a local Hugging Face folder (config.json and
    safetensors) of a Llama-family causal LM sharing the target's vocabulary.
    Required."""

    top_k: int = 4
    """Candidates drafted per graph node (the draft's top-k). 1 gives a chain."""

    merge_context: int = 1
    """τ of the paper's τ-redundancy rule: a candidate is merged into an existing
    node with the same token whose τ preceding tokens are equal. 0 merges on
    the token alone; -1 disables merging (a plain token tree)."""

    sibling_ratio: float = 0.2
    """Keep a candidate only if its draft probability is at least this fraction
    of its best sibling's. 0 keeps all top_k."""

    min_node_prob: float = 0.02
    """Drop a candidate whose draft path probability (product of the draft's
    conditional probabilities from the root) is below this."""

    max_depth: int = 5
    """Deepest tree level drafted and verified; also the number of draft
    forward passes per step."""

    max_draft_nodes: int = 32
    """Most graph nodes drafted per request per step (draft compute budget)."""

    max_verify_nodes: int = 12
    """Most tree nodes the target verifies per request per step (the tree is
    cut to its most probable nodes). vLLM's num_speculative_tokens is set to
    this; at most 128."""

    draft_vocab_size: int = 0
    """Restrict the draft's LM head to this many most frequent tokens (counted
    in the draft folder's gsd_token_counts.npy); 0 keeps the whole
    vocabulary. A cheaper head for a narrow draft; still lossless, since the
    target verifies every token."""

    lookup_tokens: int = 3
    """Greedy requests also get a path of up to this many tokens from their
    own context (prompt lookup: what followed the last time their latest
    tokens occurred; `vllm_gsd.lookup`), at no draft cost; the budget
    verifies it where it pays. 0 turns this off."""

    prompt_lookup_min: int = 2
    """Shortest suffix of the context lookup matches (vLLM's ngram knob)."""

    prompt_lookup_max: int = 16
    """Longest suffix of the context lookup matches (vLLM's ngram knob).
    Long, because the budget calibrates paths by the length that matched
    (`vllm_gsd.lookup.MATCH_LENGTH_BUCKETS`): a path after a 16-token match
    is right far more often than one after a 4-token match."""

    budget: str = "adaptive"
    """How much of each tree to verify. "adaptive": every step, the nodes
    (possibly none) that maximise expected tokens per second, from the
    running acceptance and the measured cost of steps on this hardware at
    this batch size (`vllm_gsd.budget`); "fixed": always the whole tree of
    up to max_verify_nodes."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_user_dict(cls, user: dict[str, Any]) -> GSDConfig:
        """Validates the user's speculative_config (method "gsd" removed)."""
        user = {k.replace("-", "_"): v for k, v in user.items()}
        if "num_speculative_tokens" in user:
            # vLLM users know this key; for GSD it is the verify budget.
            alias = user.pop("num_speculative_tokens")
            if "max_verify_nodes" in user and user["max_verify_nodes"] != alias:
                raise GSDConfigError(
                    "speculative_config: num_speculative_tokens "
                    f"({alias}) and max_verify_nodes ({user['max_verify_nodes']}) "
                    "disagree; for method 'gsd' they are the same budget, give one."
                )
            user["max_verify_nodes"] = alias
        unknown = sorted(set(user) - set(cls.field_names()))
        if unknown:
            raise GSDConfigError(
                f"speculative_config: unknown key(s) {unknown} for method 'gsd'. "
                f"Allowed keys: {['method', *cls.field_names(), 'num_speculative_tokens']}."
            )
        if "model" not in user or not user["model"]:
            raise GSDConfigError(
                "speculative_config: method 'gsd' needs 'model', the path of "
                "the draft model folder."
            )
        config = cls(**user)
        config._validate()
        return config

    def _validate(self) -> None:
        _check_type("model", self.model, str)
        for name in ("top_k", "merge_context", "max_depth", "max_draft_nodes",
                     "max_verify_nodes", "draft_vocab_size", "lookup_tokens",
                     "prompt_lookup_min", "prompt_lookup_max"):
            _check_type(name, getattr(self, name), int)
        for name in ("sibling_ratio", "min_node_prob"):
            _check_type(name, getattr(self, name), (int, float))
        _check_range("top_k", self.top_k, 1, 64)
        _check_range("merge_context", self.merge_context, -1, 64)
        _check_range("sibling_ratio", self.sibling_ratio, 0.0, 1.0)
        _check_range("min_node_prob", self.min_node_prob, 0.0, 1.0)
        _check_range("max_depth", self.max_depth, 1, MAX_VERIFY_NODES)
        _check_range("max_draft_nodes", self.max_draft_nodes, 1, 4096)
        _check_range("max_verify_nodes", self.max_verify_nodes, 1, MAX_VERIFY_NODES)
        _check_range("draft_vocab_size", self.draft_vocab_size, 0, 2**31 - 1)
        _check_range("lookup_tokens", self.lookup_tokens, 0, MAX_VERIFY_NODES)
        _check_range("prompt_lookup_min", self.prompt_lookup_min, 1, 64)
        _check_range("prompt_lookup_max", self.prompt_lookup_max, 1, 64)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise GSDConfigError(
                f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) is "
                f"larger than prompt_lookup_max ({self.prompt_lookup_max}).")
        if 0 < self.draft_vocab_size < self.top_k:
            raise GSDConfigError(
                f"speculative_config.draft_vocab_size: {self.draft_vocab_size} is "
                f"smaller than top_k ({self.top_k}); use 0 (whole vocabulary) or "
                "at least top_k.")
        _check_type("budget", self.budget, str)
        if self.budget not in BUDGETS:
            raise GSDConfigError(
                f"speculative_config.budget: {self.budget!r} is not one of "
                f"{list(BUDGETS)}.")

    def check_draft_model(self, target_vocab_size: int) -> None:
        """Checks the draft folder exists, holds the weights its config.json
        describes, and shares the target's vocabulary."""
        from vllm_gsd.draft_model import (check_draft_weights, frequent_token_ids,
                                          read_draft_config)

        try:
            draft_hf_config = read_draft_config(self.model)
            if self.draft_vocab_size:
                frequent_token_ids(self.model, self.draft_vocab_size)
        except ValueError as e:
            raise GSDConfigError(f"speculative_config.model: {e}") from e
        draft_vocab = draft_hf_config.get("vocab_size")
        if draft_vocab != target_vocab_size:
            raise GSDConfigError(
                f"speculative_config.model: the draft's vocab_size ({draft_vocab}) "
                f"differs from the target's ({target_vocab_size}); GSD verifies "
                "draft token ids directly, so both must share one tokenizer."
            )
        try:
            check_draft_weights(self.model, draft_hf_config)
        except ValueError as e:
            raise GSDConfigError(f"speculative_config.model: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_type(name: str, value: Any, expected: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, expected):
        names = (expected,) if isinstance(expected, type) else expected
        raise GSDConfigError(
            f"speculative_config.{name}: expected "
            f"{' or '.join(t.__name__ for t in names)}, got {value!r}."
        )


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise GSDConfigError(
            f"speculative_config.{name}: {value!r} is out of range; "
            f"allowed {low} to {high}."
        )
