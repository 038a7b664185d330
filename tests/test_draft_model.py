"""TreeDraftModel against transformers' LlamaForCausalLM on a tiny random Llama.

The draft runner re-implements the Llama forward pass over a paged KV cache
(plus scratch rows) with a tree mask; transformers is the reference. Runs in
seconds, no real model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_gsd.draft_model import (GROUPED_ATTENTION_MAX_QUERIES, SINK, TOKEN_COUNTS_FILE,
                                  DenseKernels, DraftKVCache, TreeDraftModel, tree_attention)
from vllm_gsd.patches import vllm_cpu_kernels

transformers = pytest.importorskip("transformers")

VOCAB = 128
ATOL = 1e-4


def tiny_llama(path, tie: bool):
    """A random 2-layer Llama saved to `path`; returns the HF model (float32).

    rope_theta is SmolLM2's (not the library default) so a runner that misreads
    the config's RoPE base fails; weights are larger than the usual init so
    attention is far from uniform and position errors show in the logits.
    """
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(path)
    return model


def hf_next_logits(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] logits of a plain causal pass."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0]


BLOCK_SIZE = 4
# The request's blocks, out of order and never block 0 (vLLM's null block), as
# a block table gives them: slot errors change the logits.
BLOCK_IDS = np.random.default_rng(0).permutation(np.arange(1, 65)).tolist()


KERNELS = {"torch": DenseKernels, "vllm_cpu": vllm_cpu_kernels}
"""The draft's dense ops: PyTorch's, and vLLM's that the proposer uses on CPU."""


def runner(path, head_vocab: int = 0, kernels: str = "torch") -> TreeDraftModel:
    return TreeDraftModel(str(path), torch.float32, torch.device("cpu"),
                          head_vocab=head_vocab, kernels=KERNELS[kernels]())


def new_cache(draft: TreeDraftModel, num_tokens: int = 32) -> DraftKVCache:
    # NaN wherever nothing was written: reading such a slot shows in the logits.
    blocks = max(BLOCK_IDS[:-(-num_tokens // BLOCK_SIZE)]) + 1
    shape = (blocks, 2, BLOCK_SIZE, draft.num_kv_heads, draft.head_dim)
    return DraftKVCache([torch.full(shape, float("nan")) for _ in range(draft.num_layers)],
                        BLOCK_SIZE, draft.new_scratch(8))


def slots(positions) -> torch.Tensor:
    """Paged slots of token positions under BLOCK_IDS."""
    positions = torch.as_tensor(positions)
    return torch.tensor(BLOCK_IDS)[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE


def causal_logits(draft: TreeDraftModel, tokens: list[int],
                  cache: DraftKVCache | None = None) -> torch.Tensor:
    """A plain causal pass: every token's K/V go to its paged slot."""
    n = len(tokens)
    cache = cache or new_cache(draft, n)
    none = torch.zeros((1, 0), dtype=torch.long)
    return draft.forward(
        cache, torch.tensor([tokens]), positions=torch.arange(n)[None],
        write_slots=slots(torch.arange(n))[None], write_rows=torch.full((1, n), SINK),
        read_slots=slots(torch.arange(n))[None], read_rows=none,
        attend=torch.ones(n, n, dtype=torch.bool).tril()[None])[0]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("tie", [True, False], ids=["tied_head", "separate_head"])
def test_causal_forward_matches_transformers(tmp_path, tie, kernels):
    model = tiny_llama(tmp_path, tie)
    draft = runner(tmp_path, kernels=kernels)
    tokens = [3, 17, 99, 42, 5, 64, 127, 8, 1, 30]
    torch.testing.assert_close(causal_logits(draft, tokens), hf_next_logits(model, tokens),
                               atol=ATOL, rtol=0)


def test_logits_of_one_query_per_row_equal_the_full_pass(tmp_path):
    """A catch-up needs only its last token's logits: asking for one query
    per row gives exactly that query's row of the full pass."""
    tiny_llama(tmp_path, tie=False)
    draft = runner(tmp_path)
    tokens = [3, 17, 99, 42, 5, 64]
    n = len(tokens)
    full = causal_logits(draft, tokens)
    inputs = (torch.tensor([tokens, tokens[::-1]]), torch.arange(n).repeat(2, 1),
              torch.stack([slots(torch.arange(n)), slots(torch.arange(n) + 8)]),
              torch.full((2, n), SINK),
              torch.stack([slots(torch.arange(n)), slots(torch.arange(n) + 8)]),
              torch.zeros((2, 0), dtype=torch.long),
              torch.ones(n, n, dtype=torch.bool).tril().repeat(2, 1, 1))
    both = draft.forward(new_cache(draft), *inputs)
    picked = draft.forward(new_cache(draft), *inputs, logits_at=torch.tensor([n - 1, 2]))
    assert picked.shape == (2, 1, VOCAB)
    torch.testing.assert_close(picked[0, 0], full[n - 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(picked[:, 0], both[[0, 1], [n - 1, 2]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("tie", [True, False], ids=["tied_head", "separate_head"])
def test_reduced_head_keeps_the_most_frequent_tokens_columns(tmp_path, tie):
    model = tiny_llama(tmp_path, tie)
    counts = np.zeros(VOCAB, dtype=np.int64)
    counts[[90, 5, 17, 64, 2]] = [50, 40, 40, 9, 1]  # 5 and 17 tie: lower id first
    np.save(tmp_path / TOKEN_COUNTS_FILE, counts)
    draft = runner(tmp_path, head_vocab=4)
    assert draft.head_token_ids.tolist() == [90, 5, 17, 64]
    tokens = [3, 17, 99, 42, 5]
    full = hf_next_logits(model, tokens)
    torch.testing.assert_close(causal_logits(draft, tokens), full[:, [90, 5, 17, 64]],
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch,num_queries", [
    (1, 1), (3, 1), (3, 2), (16, GROUPED_ATTENTION_MAX_QUERIES),
    (1, 3), (2, GROUPED_ATTENTION_MAX_QUERIES + 1)])
def test_tree_attention_equals_sdpa_with_grouped_heads(batch, num_queries):
    """Both of tree_attention's ways (its own products for a few queries
    per request, SDPA otherwise) give SDPA's result: query head h reads K/V
    head h // 3, masked columns (a tree mask; a padded query that sees only
    column 0) contribute nothing."""
    generator = torch.Generator().manual_seed(batch * 10 + num_queries)
    heads, kv_heads, dim, keys = 6, 2, 16, 11
    q = torch.randn(batch, heads, num_queries, dim, generator=generator)
    k = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    v = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    mask = torch.rand(batch, 1, num_queries, keys, generator=generator) < 0.6
    mask[..., 0] = True
    mask[0, 0, -1] = False
    mask[0, 0, -1, 0] = True  # a padded query
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=mask)
    torch.testing.assert_close(tree_attention(q, k, v, mask), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernels", KERNELS)
def test_sibling_queries_each_see_only_their_own_branch(tmp_path, kernels):
    """Two siblings at the same position (and a child of the first) in one
    pass, their K/V in scratch rows and the prefix's in pages, equal
    transformers run on each branch as a plain sequence."""
    model = tiny_llama(tmp_path, tie=True)
    draft = runner(tmp_path, kernels=kernels)
    prefix = [7, 21, 64, 3, 90, 11]
    m = len(prefix)
    cache = new_cache(draft)
    causal_logits(draft, prefix, cache)

    a, b, child = 40, 77, 12
    # Key columns: the prefix's m slots, then scratch rows 3 (a), 5 (b), 2 (child of a).
    attend = torch.zeros(3, m + 3, dtype=torch.bool)
    attend[:, :m] = True
    attend[0, m] = True
    attend[1, m + 1] = True
    attend[2, [m, m + 2]] = True
    logits = draft.forward(
        cache, tokens=torch.tensor([[a, b, child]]),
        positions=torch.tensor([[m, m, m + 1]]),
        write_slots=torch.full((1, 3), SINK), write_rows=torch.tensor([[3, 5, 2]]),
        read_slots=slots(torch.arange(m))[None], read_rows=torch.tensor([[3, 5, 2]]),
        attend=attend[None])[0]

    torch.testing.assert_close(logits[0], hf_next_logits(model, prefix + [a])[-1],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], hf_next_logits(model, prefix + [b])[-1],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[2], hf_next_logits(model, prefix + [a, child])[-1],
                               atol=ATOL, rtol=0)


def test_shipped_distilled_draft_assembles_and_agrees_with_the_target(model_dir, distilled_draft):
    """prepare_models.py puts the target's embedding back into the shipped
    trained layers: the runner must match transformers on the assembled
    folder, and the draft must predict the target's greedy next token far
    more often than chance (a wrong embedding or layer order gives ~0)."""
    draft_dir = Path(distilled_draft)
    draft_hf = transformers.AutoModelForCausalLM.from_pretrained(
        draft_dir, dtype=torch.float32).eval()
    target_hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir / "smollm2-135m", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(draft_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain how a bicycle gear works."}],
        tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text).input_ids
    with torch.no_grad():
        tokens = target_hf.generate(torch.tensor([prompt]), max_new_tokens=48,
                                    do_sample=False)[0].tolist()
    draft = TreeDraftModel(str(draft_dir), torch.float32, torch.device("cpu"))
    cache = new_cache(draft, len(tokens))
    ours = causal_logits(draft, tokens, cache)
    torch.testing.assert_close(ours, hf_next_logits(draft_hf, tokens), atol=1e-3, rtol=0)
    generated = slice(len(prompt) - 1, len(tokens) - 1)
    agreement = (ours[generated].argmax(-1) == torch.tensor(tokens[len(prompt):])).float().mean()
    print(f"distilled draft top-1 agreement on the target's greedy text: {agreement:.2f}")
    assert agreement > 0.25


def test_no_benchmark_or_demo_prompt_is_in_the_distillation_set():
    """The benchmarks and the demo measure the distilled draft on prompts it
    never trained on (benchmark runs up to 13 had one that it had, a
    palindrome function, and the demo a Fibonacci one)."""
    import sys

    from conftest import REPO
    sys.path.insert(0, str(REPO / "scripts"))
    from benchmark import PROMPTS
    from demo import PROMPTS as DEMO_PROMPTS
    from distill_draft import build_prompts

    def normal(text: str) -> str:
        return " ".join(text.lower().split())

    distilled = {normal(content) for prompt in build_prompts()
                 for _, content in prompt.messages}
    measured = [text for _, text, _ in PROMPTS] + DEMO_PROMPTS
    assert [text for text in measured if normal(text) in distilled] == []


def test_a_draft_batchs_key_columns_come_in_whole_steps():
    """A context a token longer is no new attention shape (each costs a
    oneDNN kernel build in bf16, about 0.4 ms); the padding columns read
    the SINK slot and nobody attends them."""
    from vllm_gsd.graph import TokenGraph
    from vllm_gsd.proposer import KEY_COLUMNS_STEP, _Drafting, _DraftBatch

    def drafting(context: int) -> _Drafting:
        tokens = np.arange(context)
        return _Drafting("r", tokens, TokenGraph(tokens[-2:], 1, 8), 4, True, False,
                         context - 1, np.arange(100, 100 + context),
                         scratch_rows=[1, 2, 3])

    shapes = set()
    for longest in (70, 71, 90):
        batch = _DraftBatch([drafting(longest), drafting(40)], [2, 2])
        columns = batch.num_paged + batch.read_rows.shape[1]
        assert columns % KEY_COLUMNS_STEP == 0 and columns >= longest + 3
        assert (batch.read_slots[0, longest:] == SINK).all()
        assert not batch.attend[:, :, longest:batch.num_paged].any()
        shapes.add(columns)
    assert len(shapes) == 1
