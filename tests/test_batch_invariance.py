"""Batch invariance: with the engine's kernels, a verify pass's rows compute the bits of plain decoding's 1-token
steps, so speculative greedy output is plain decoding's exactly, by construction.

Compared bitwise (`torch.equal`), not within a tolerance: every row of a causal verify pass of 1-32 tokens, and
every row on a token tree's paths, against the logits of plain steps over the same tokens, in three model
families (Llama; Qwen2, whose projections have biases; Mistral, whose sliding window is smaller than the
sequence), with the kernels' raw products and attention checked the same way.
"""

from __future__ import annotations

import pytest
import torch

from knnssd.engine.decoding import prefill, project_logits
from knnssd.engine.kernel_build import compiled_kernel, vector_isa
from knnssd.engine.kernels import MAX_FAST_ROWS, accelerate
from knnssd.engine.sampling import SamplingConfig
from knnssd.engine.tree import depths, tree_mask
from tests.conftest import FAMILIES, tiny_model


def kernels_or_skip():
    kernel = compiled_kernel()
    if kernel is None:
        pytest.skip("the engine's C++ kernels are not built on this machine (no AVX-512 or AVX2 with FMA, or no "
                    "compiler): plain decoding and verify passes then use library products, which are not "
                    "batch-invariant")
    return kernel


def invariant_model(family: str, **overrides):
    kernels_or_skip()
    model = tiny_model(family, num_layers=3, vocab_size=160, **overrides)
    plan = accelerate(model)
    assert plan.batch_invariant, plan.describe()
    return model


def prefilled(model, prompt):
    return prefill(model, prompt, SamplingConfig(), None, lambda: 0.0)


def forward(model, cache, tokens, positions, mask=None):
    """Logits (n, vocab) of one pass over `tokens` at `positions` after what `cache` holds."""
    hidden = model.model(input_ids=torch.tensor([tokens]), position_ids=torch.tensor([positions]),
                         attention_mask=mask, cache=cache, use_cache=True).last_hidden_state[0]
    return project_logits(model, hidden)


def plain_steps(model, prompt, tokens):
    """Logits of plain decoding's 1-token steps over `tokens` after `prompt` (1, T): row i is the step whose input
    is tokens[i]."""
    state = prefilled(model, prompt)
    position = prompt.shape[1]
    rows = [forward(model, state.cache, [token], [position + i])[0] for i, token in enumerate(tokens)]
    return torch.stack(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_rows_are_plain_steps_bitwise(family):
    model = invariant_model(family)
    generator = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, 160, (1, 21), generator=generator)
    tokens = torch.randint(3, 160, (MAX_FAST_ROWS,), generator=generator).tolist()
    plain = plain_steps(model, prompt, tokens)
    for width in (1, 2, 3, 5, 8, 13, 16, 17, 24, MAX_FAST_ROWS):
        state = prefilled(model, prompt)
        rows = forward(model, state.cache, tokens[:width], list(range(21, 21 + width)))
        assert torch.equal(rows, plain[:width]), f"{family} width {width}"


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_rows_are_plain_steps_bitwise(family):
    """A tree whose path 0 -> 2 -> 5 -> 6 carries the tokens plain decoding feeds, the other nodes noise: the rows
    of the root and of that path equal the plain steps' logits."""
    model = invariant_model(family)
    generator = torch.Generator().manual_seed(11)
    prompt = torch.randint(3, 160, (1, 30), generator=generator)
    last, path = 5, torch.randint(3, 160, (4,), generator=generator).tolist()
    parents = [-1, -1, 0, 1, 2, 2, 5, -1]  # nodes 0, 2, 5, 6 are the path
    tokens = torch.randint(3, 160, (len(parents),), generator=generator).tolist()
    for node, token in zip((0, 2, 5, 6), path):
        tokens[node] = token
    plain = plain_steps(model, prompt, [last] + path)
    state = prefilled(model, prompt)
    position = prompt.shape[1]
    mask = tree_mask(model, state.cache, parents, position)
    positions = (position + torch.tensor([0] + depths(parents))).tolist()
    rows = forward(model, state.cache, [last] + tokens, positions, mask)
    assert torch.equal(rows[[0, 1, 3, 6, 7]], plain)


def test_products_and_attention_do_not_depend_on_the_row_count():
    kernel = kernels_or_skip()
    generator = torch.Generator().manual_seed(3)
    for rows, (n, k) in [(1, (100, 77)), (7, (260, 576)), (MAX_FAST_ROWS, (129, 1536))]:
        x, w = torch.randn(rows, k, generator=generator), torch.randn(n, k, generator=generator)
        out = kernel.rows_gemm(x, w)
        assert torch.equal(out, torch.cat([kernel.rows_gemm(x[i:i + 1], w) for i in range(rows)]))
        assert torch.allclose(out, x @ w.T, atol=1e-3, rtol=1e-4)
    queries, heads, kv_heads, keys, dim = 9, 6, 2, 50, 24
    q = torch.randn(queries, heads, dim, generator=generator)
    k, v = (torch.randn(kv_heads, keys + 10, dim, generator=generator)[:, :keys] for _ in range(2))  # strided views
    mask = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    out = kernel.rows_attention(q, k, v, mask, dim ** -0.5)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(3, 0), v.repeat_interleave(3, 0), attn_mask=mask).transpose(0, 1)
    assert torch.allclose(out, reference, atol=1e-5)
    for t in range(queries):
        alone = kernel.rows_attention(q[t:t + 1], k[:, :keys - queries + t + 1], v[:, :keys - queries + t + 1],
                                      None, dim ** -0.5)
        assert torch.equal(alone[0], out[t])


@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 2, 16), (10, 2, 32), (9, 3, 64), (7, 1, 64), (16, 2, 128)])
def test_query_heads_taken_together_compute_each_heads_bits(heads, kv_heads, dim):
    """Attention takes the query heads that share a key/value head together (up to 4 with AVX-512, 2 with AVX2):
    the same bits as each head alone, for head dimensions whose weighted sums live in registers (1, 2, 4 vectors),
    one at a time (8) and group sizes that leave a remainder. Each head alone: the keys and values repeated so that
    every query head has its own key/value head (groups of one). Rows alone: the same bits as the 9-row pass."""
    kernel = kernels_or_skip()
    generator = torch.Generator().manual_seed(heads * dim)
    queries, keys = 9, 40
    q = torch.randn(queries, heads, dim, generator=generator)
    k, v = (torch.randn(kv_heads, keys, dim, generator=generator) for _ in range(2))
    mask = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    mask[4, 3] = mask[6, 10] = False  # tree-like holes: masked keys are skipped
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = kernel.rows_attention(q, k, v, mask, dim ** -0.5)
        group = heads // kv_heads
        heads_alone = kernel.rows_attention(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), mask,
                                            dim ** -0.5)
        assert torch.equal(heads_alone, out)
        for t in range(queries):
            alone = kernel.rows_attention(q[t:t + 1], k, v, mask[t:t + 1], dim ** -0.5)
            assert torch.equal(alone[0], out[t])
    finally:
        torch.set_num_threads(threads)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0),
        attn_mask=mask).transpose(0, 1)
    assert torch.allclose(out, reference, atol=1e-5)


def test_the_thread_count_changes_no_bit():
    """A search task replays drafts on one thread (`pipeline.tasks.search_worker`); the runtime decodes on
    several. Threads split the kernels' weight rows and attention heads, never a sum, so products, attention and a
    whole model pass (layers wide enough that two threads each take a share) compute the same bits."""
    kernel = kernels_or_skip()
    generator = torch.Generator().manual_seed(5)
    x, w = torch.randn(5, 576, generator=generator), torch.randn(3000, 576, generator=generator)
    q = torch.randn(5, 8, 32, generator=generator)
    k, v = (torch.randn(4, 300, 32, generator=generator) for _ in range(2))
    model = invariant_model("llama", hidden_size=256, intermediate_size=1024, num_attention_heads=8,
                            num_key_value_heads=4)
    prompt = torch.randint(3, 160, (1, 40), generator=generator)
    before = torch.get_num_threads()
    outputs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            state = prefilled(model, prompt)
            outputs[threads] = (kernel.rows_gemm(x, w), kernel.rows_attention(q, k, v, None, 32 ** -0.5),
                                forward(model, state.cache, [5, 6, 7, 8], [40, 41, 42, 43]))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(outputs[1], outputs[2]):
        assert torch.equal(one, two)


def test_the_check_can_fail():
    """Library products are not batch-invariant: the test above would see it (so it is not vacuous)."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 576, generator=generator), torch.randn(3000, 576, generator=generator)
    library = (w @ x.T).T
    one_by_one = torch.cat([torch.nn.functional.linear(x[i:i + 1], w) for i in range(16)])
    assert not torch.equal(library, one_by_one)


def test_the_plan_names_its_instruction_set():
    kernels_or_skip()
    model = tiny_model("llama", num_layers=1)
    plan = accelerate(model)
    assert vector_isa() in ("avx512", "avx2") and f"{vector_isa()}, batch-invariant" in plan.describe()
    assert plan.describe().startswith(f"rows 1-{MAX_FAST_ROWS}, attention rows 1-{MAX_FAST_ROWS}")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_weights_placed_and_joined_change_no_bit(family):
    """`accelerate` moves the weights into one arena (huge pages where the OS allows) with each layer's q, k, v
    and gate, up adjacent, and a step multiplies each group in one product. Qwen2's q, k and v have biases, added
    after the split. Every logit of plain steps and of a verify pass equals the bits of a model left in place
    with one product per projection; a group whose parameter moved elsewhere falls back to separate products."""
    kernels_or_skip()
    placed = tiny_model(family, num_layers=3, vocab_size=160)
    separate = tiny_model(family, num_layers=3, vocab_size=160, fast_kernels=False)
    assert accelerate(separate, place=False).weights == ""
    plan = accelerate(placed)
    assert plan.batch_invariant and "3 groups joined" not in plan.weights and "6 groups joined" in plan.weights
    from knnssd.engine.fastlayer import STEP_ATTRIBUTE

    steps = [vars(layer)[STEP_ATTRIBUTE] for layer in placed.model.layers]
    assert all(step.qkv is not None and step.gate_up is not None for step in steps)
    assert not any(STEP_ATTRIBUTE in vars(layer) and vars(layer)[STEP_ATTRIBUTE].qkv for layer in separate.model.layers)
    generator = torch.Generator().manual_seed(11)
    prompt = torch.randint(3, 160, (1, 19), generator=generator)
    tokens = torch.randint(3, 160, (8,), generator=generator).tolist()
    expected = plain_steps(separate, prompt, tokens)
    assert torch.equal(plain_steps(placed, prompt, tokens), expected)
    state = prefilled(placed, prompt)
    assert torch.equal(forward(placed, state.cache, tokens, list(range(19, 27))), expected)
    attn = placed.model.layers[1].self_attn
    with torch.no_grad():
        attn.k_proj.weight.data = attn.k_proj.weight.data.clone()  # no longer adjacent: the join must not be used
    assert not steps[1].qkv.current([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(plain_steps(placed, prompt, tokens), expected)


def test_a_replaced_weight_is_used_not_the_joined_copy():
    """`load_state_dict(..., assign=True)` replaces the parameter objects; the old ones keep their addresses, so a
    join that only checked addresses would multiply by the old q, k, v. The step must use the new weights: the
    logits equal a model built with them from the start."""
    kernels_or_skip()
    model = tiny_model("llama", num_layers=2, vocab_size=160)
    other = tiny_model("llama", seed=3, num_layers=2, vocab_size=160)
    model.load_state_dict({name: tensor.clone() for name, tensor in other.state_dict().items()}, assign=True)
    prompt = torch.randint(3, 160, (1, 12), generator=torch.Generator().manual_seed(2))
    tokens = [5, 9, 11, 40]
    assert torch.equal(plain_steps(model, prompt, tokens), plain_steps(other, prompt, tokens))
