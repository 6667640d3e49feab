"""The fast decoder-layer step (`knnssd.engine.fastlayer`) computes transformers' layer bit for bit.

A step through the fast path and the same step through the layer's class forward (the fast path uninstalled, the
same kernels for products, norms and attention) must give identical logits and identical cache entries, at every
width 1-32, for a token tree's mask, and after the cache's buffer has grown; and the fast path must actually be
taken where a step qualifies (counted by the cache's `update`, which only the class forward calls) and not where
it does not (a layer-skip draft, a prefill, a family whose layers are not Llama's).
"""

from __future__ import annotations

import pytest
import torch

from knnssd.engine import fastlayer
from knnssd.engine.kernels import MAX_FAST_ROWS, accelerate, transformers_kernels
from knnssd.engine.kvcache import PreallocatedLayer, new_cache, rollback
from knnssd.engine.skipset import SkipSet
from knnssd.engine.sublayers import skip_sublayers
from knnssd.engine.tree import depths, tree_mask
from tests.conftest import tiny_model
from tests.test_batch_invariance import kernels_or_skip


@pytest.fixture
def model():
    kernels_or_skip()
    model = tiny_model("llama", num_layers=3, vocab_size=160)
    accelerate(model)
    return model


@pytest.fixture
def updates(monkeypatch):
    """How many times a cache layer's `update` ran (the class forward's write; the fast path writes in place)."""
    calls = [0]
    original = PreallocatedLayer.update

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreallocatedLayer, "update", counted)
    return calls


def run(model, cache, tokens, positions, mask=None):
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([tokens]), position_ids=torch.tensor([positions]), attention_mask=mask,
                    cache=cache, use_cache=True).logits[0]
    return out, [layer.keys.clone() for layer in cache.layers], [layer.values.clone() for layer in cache.layers]


def prefilled(model, prompt_length, capacity=None):
    cache = new_cache(model, capacity=capacity)
    tokens = torch.randint(3, 160, (prompt_length,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode(), transformers_kernels(model):
        model(input_ids=torch.tensor([tokens]), cache=cache, use_cache=True)
    return cache


def both_paths(model, prompt_length, tokens, positions, mask_of=None, capacity=None):
    """(fast, library) results of one pass after the same prefill."""
    saved = fastlayer.saved_steps(model)
    assert saved, "no layer got the fast path"
    results = []
    for install in (True, False):
        fastlayer.restore_steps(saved) if install else fastlayer.uninstall(model)
        cache = prefilled(model, prompt_length, capacity)
        mask = mask_of(cache) if mask_of else None
        results.append(run(model, cache, tokens, positions, mask))
    fastlayer.restore_steps(saved)
    return results


def assert_same(fast, library):
    assert torch.equal(fast[0], library[0])
    assert all(torch.equal(a, b) for a, b in zip(fast[1], library[1]))
    assert all(torch.equal(a, b) for a, b in zip(fast[2], library[2]))


def test_every_width_is_the_class_forward_bitwise(model, updates):
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, 160, (MAX_FAST_ROWS,), generator=generator).tolist()
    for width in (1, 2, 7, 16, MAX_FAST_ROWS):
        updates[0] = 0
        fast, library = both_paths(model, 21, tokens[:width], list(range(21, 21 + width)))
        assert_same(fast, library)
        assert updates[0] == 3 + 3 + 3  # the two prefills and the library pass: 3 layers each; the fast pass none


def test_a_tree_mask_and_a_growing_buffer(model, updates):
    parents = [-1, -1, 0, 1, 2, 2, 5, -1]
    tokens = [9] + torch.randint(3, 160, (len(parents),), generator=torch.Generator().manual_seed(2)).tolist()
    positions = (30 + torch.tensor([0] + depths(parents))).tolist()
    fast, library = both_paths(model, 30, tokens, positions, lambda cache: tree_mask(model, cache, parents, 30))
    assert_same(fast, library)
    # a capacity of exactly the prompt: the step's write grows the buffer (reserve) on both paths
    fast, library = both_paths(model, 30, tokens[:5], list(range(30, 35)), capacity=30)
    assert_same(fast, library)


def test_the_fast_path_steps_aside_where_a_step_does_not_qualify(model, updates):
    cache = prefilled(model, 12)
    updates[0] = 0
    with skip_sublayers(model, SkipSet(attn=(1,), mlp=(2,))):  # a layer-skip draft: class forwards
        run(model, cache, [5], [12])
    # layer 0 (nothing skipped) steps fast; layer 1 (attention skipped) writes nothing; layer 2 (MLP skipped)
    # runs the class forward, which writes through update()
    assert updates[0] == 1
    rollback(cache, 12)
    updates[0] = 0
    run(model, cache, [5, 6], [12, 13])
    assert updates[0] == 0
    updates[0] = 0
    run(model, new_cache(model), list(range(3, 3 + MAX_FAST_ROWS + 1)), list(range(MAX_FAST_ROWS + 1)))
    assert updates[0] == 3  # a prefill wider than the kernels' steps


@pytest.mark.parametrize("family", ["qwen2"])
def test_qwen2_biases_are_the_class_forward_bitwise(family, updates):
    kernels_or_skip()
    model = tiny_model(family, num_layers=2, vocab_size=160)
    accelerate(model)
    assert len(fastlayer.saved_steps(model)) == 2
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    tokens = torch.randint(3, 160, (9,), generator=torch.Generator().manual_seed(8)).tolist()
    updates[0] = 0
    fast, library = both_paths(model, 17, tokens, list(range(17, 26)))
    assert_same(fast, library)
    assert updates[0] == 2 + 2 + 2


def test_only_llama_shaped_layers_get_it_and_restore_takes_it_away():
    kernels_or_skip()
    mistral = tiny_model("mistral", num_layers=2, vocab_size=160)
    accelerate(mistral)
    assert not fastlayer.saved_steps(mistral)  # Mistral's attention slides: transformers' path
    llama = tiny_model("llama", num_layers=2, vocab_size=160)
    accelerate(llama)
    assert len(fastlayer.saved_steps(llama)) == 2
    with transformers_kernels(llama):
        assert not fastlayer.saved_steps(llama)
    assert len(fastlayer.saved_steps(llama)) == 2
    accelerate(llama, enabled=True)
    from knnssd.engine.kernels import restore

    restore(llama)
    assert not fastlayer.saved_steps(llama) and "forward" not in vars(llama.model.layers[0])


def test_rope_kernel_rounds_as_the_library_does():
    kernel = kernels_or_skip()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(4)
    rows, heads, kv_heads, dim, start = 5, 6, 2, 32, 11
    q = torch.randn(rows, heads * dim, generator=generator)
    k, v = torch.randn(rows, kv_heads * dim, generator=generator), torch.randn(rows, kv_heads * dim, generator=generator)
    angles = torch.rand(rows, dim // 2, generator=generator) * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    keys, values = torch.zeros(1, kv_heads, 20, dim), torch.zeros(1, kv_heads, 20, dim)
    out = kernel.rows_rope_kv(q, k, v, cos, sin, keys, values, start)
    q_ref, k_ref = apply_rotary_pos_emb(q.view(1, rows, heads, dim).transpose(1, 2),
                                        k.view(1, rows, kv_heads, dim).transpose(1, 2), cos[None], sin[None])
    assert torch.equal(out, q_ref[0].transpose(0, 1))
    assert torch.equal(keys[:, :, start:start + rows], k_ref)
    assert torch.equal(values[0, :, start:start + rows], v.view(rows, kv_heads, dim).transpose(0, 1))
    assert not keys[:, :, :start].any() and not keys[:, :, start + rows:].any()


def test_an_intermediate_size_off_the_vector_width(updates):
    """With gate and up from one joined product, their column slices are strided for more than one row, so the
    activation runs row by row, each row as a 1-row step runs it. With an intermediate size that is no multiple of
    any vector width (100), verify rows must still compute the bits of plain steps, and a 1-row step the class
    forward's. (The class forward's activation runs over one flat (T, 100) buffer, where which elements take the
    vector exp and which the scalar tail depends on T: its 9- and 32-row passes differ from its plain steps, found
    by hand on 2026-12-05. Every real model's intermediate size is a multiple of 16, where the two agree.)"""
    kernels_or_skip()
    from tests.test_batch_invariance import forward, plain_steps, prefilled as prefilled_state

    model = tiny_model("llama", num_layers=2, vocab_size=160, intermediate_size=100)
    assert all(step.gate_up is not None for step in (vars(layer)[fastlayer.STEP_ATTRIBUTE]
                                                     for layer in model.model.layers))
    tokens = torch.randint(3, 160, (MAX_FAST_ROWS,), generator=torch.Generator().manual_seed(8)).tolist()
    fast, library = both_paths(model, 21, tokens[:1], [21])
    assert_same(fast, library)
    prompt = torch.randint(3, 160, (1, 21), generator=torch.Generator().manual_seed(9))
    plain = plain_steps(model, prompt, tokens)
    for width in (2, 9, MAX_FAST_ROWS):
        state = prefilled_state(model, prompt)
        assert torch.equal(forward(model, state.cache, tokens[:width], list(range(21, 21 + width))), plain[:width])


class Counted:
    """A layer's `LayerStep` that counts its calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.scale, self.input_eps, self.post_eps = inner.scale, inner.input_eps, inner.post_eps

    def step(self, *args):
        self.calls += 1
        return self.inner.step(*args)


def counted_steps(model):
    """Every layer's `LayerStep` replaced by a `Counted` around it; the counters."""
    counters = []
    for layer in model.model.layers:
        step = vars(layer)[fastlayer.STEP_ATTRIBUTE]
        counters.append(Counted(step.layer_step))
        step.layer_step = counters[-1]
    return counters


@pytest.mark.parametrize("family,biases", [("llama", {}), ("qwen2", {}),
                                           ("llama", {"attention_bias": True, "mlp_bias": True})])
def test_the_layer_step_is_the_calls_one_by_one(family, biases):
    """`LayerStep` (the layer's whole step in one C++ call) against the same step's kernel calls made one by one
    from Python: identical logits and cache entries at widths 1, 7 and 32 and under a tree mask, with Qwen2's q, k,
    v biases and with a bias on every projection, and the one call actually taken (once a layer a pass)."""
    kernels_or_skip()
    model = tiny_model(family, num_layers=2, vocab_size=160, **biases)
    if biases:
        assert model.model.layers[0].self_attn.o_proj.bias is not None
        assert model.model.layers[0].mlp.down_proj.bias is not None
    assert all(vars(layer)[fastlayer.STEP_ATTRIBUTE].layer_step is not None for layer in model.model.layers)
    counters = counted_steps(model)
    tokens = torch.randint(3, 160, (MAX_FAST_ROWS,), generator=torch.Generator().manual_seed(5)).tolist()
    parents = [-1, -1, 0, 1, 1, 2]
    tree = (tokens[:7], (15 + torch.tensor([0] + depths(parents))).tolist(),
            lambda cache: tree_mask(model, cache, parents, 15))
    cases = [(tokens[:width], list(range(15, 15 + width)), None) for width in (1, 7, MAX_FAST_ROWS)] + [tree]
    for chosen, positions, mask_of in cases:
        for counter in counters:
            counter.calls = 0
        cache = prefilled(model, 15)
        one_call = run(model, cache, chosen, positions, mask_of(cache) if mask_of else None)
        assert [counter.calls for counter in counters] == [1, 1]
        with fastlayer.calls_one_by_one(model):
            cache = prefilled(model, 15)
            one_by_one = run(model, cache, chosen, positions, mask_of(cache) if mask_of else None)
        assert [counter.calls for counter in counters] == [1, 1]
        assert_same(one_call, one_by_one)


def replace_down(layer):
    layer.mlp.down_proj = torch.nn.Linear(layer.mlp.down_proj.in_features, layer.mlp.down_proj.out_features,
                                          bias=False)


def shrink_norm_data(layer):
    norm = layer.post_attention_layernorm
    norm.weight.data = torch.cat([norm.weight.data, torch.ones(1)])[:-1] * 2  # new data, same shape


@pytest.mark.parametrize("change", [
    pytest.param(lambda layer: setattr(layer.input_layernorm, "variance_epsilon", 0.5), id="norm eps"),
    pytest.param(lambda layer: setattr(layer.self_attn, "scaling", 0.02), id="attention scaling"),
    pytest.param(replace_down, id="a projection module swapped"),
    pytest.param(shrink_norm_data, id="a norm weight given new data"),
    pytest.param(lambda layer: layer.mlp.act_fn.register_forward_hook(lambda module, args, out: out * 0),
                 id="a hook on the activation"),
])
def test_a_changed_layer_is_not_stepped_with_what_the_layer_step_holds(change):
    """After a change to one layer that the `LayerStep` cannot see in its held tensors, that layer's step must be
    the calls one by one (reading the layer afresh): its logits equal the class forward's with the change, and the
    changed layer's `LayerStep` is not called; the unchanged layer's still is."""
    kernels_or_skip()
    model = tiny_model("llama", num_layers=2, vocab_size=160)
    layer = model.model.layers[1]
    change(layer)
    counters = counted_steps(model)
    tokens = torch.randint(3, 160, (5,), generator=torch.Generator().manual_seed(6)).tolist()
    fast, library = both_paths(model, 13, tokens, list(range(13, 18)))
    assert_same(fast, library)
    assert counters[1].calls == 0


def test_a_gelu_mlp_takes_the_calls_one_by_one(updates):
    """`LayerStep` computes SiLU only: a layer with another activation keeps the fast step made of single calls,
    and that step is still the class forward bit for bit."""
    kernels_or_skip()
    model = tiny_model("llama", num_layers=2, vocab_size=160, hidden_act="gelu")
    steps = [vars(layer)[fastlayer.STEP_ATTRIBUTE] for layer in model.model.layers]
    assert steps and all(step.layer_step is None for step in steps)
    assert not any(step.layer_step_usable(layer) for step, layer in zip(steps, model.model.layers))
    tokens = torch.randint(3, 160, (MAX_FAST_ROWS,), generator=torch.Generator().manual_seed(7)).tolist()
    updates[0] = 0
    fast, library = both_paths(model, 11, tokens[:9], list(range(11, 20)))
    assert_same(fast, library)
    assert updates[0] == 2 + 2 + 2  # the two prefills and the library pass; the fast pass none
    # and verify rows are plain steps (exact GELU over the joined product's strided columns was not, in one call)
    from tests.test_batch_invariance import forward, plain_steps, prefilled as prefilled_state

    prompt = torch.randint(3, 160, (1, 11), generator=torch.Generator().manual_seed(9))
    plain = plain_steps(model, prompt, tokens)
    for width in (2, 9, MAX_FAST_ROWS):
        state = prefilled_state(model, prompt)
        assert torch.equal(forward(model, state.cache, tokens[:width], list(range(11, 11 + width))), plain[:width])


def test_layer_step_refuses_parts_that_do_not_fit():
    """The C++ constructor checks what it is given: a missing bias slot or a wrong size is a clear error."""
    kernel = kernels_or_skip()
    hidden, heads, kv, inter = 8, 8, 4, 12
    norm = torch.ones(hidden)
    good = dict(input_norm=norm, input_eps=1e-6, qkv=torch.zeros(heads + 2 * kv, hidden), qkv_sizes=[heads, kv, kv],
                qkv_biases=[None, None, None], scale=0.5, o=torch.zeros(hidden, heads), o_bias=None, post_norm=norm,
                post_eps=1e-6, gate_up=torch.zeros(2 * inter, hidden), gate_up_sizes=[inter, inter],
                gate_up_biases=[None, None], down=torch.zeros(hidden, inter), down_bias=None)
    kernel.LayerStep(**good)
    for wrong, message in [({"qkv_biases": [None, None]}, "3 sizes, 3 biases"),
                           ({"qkv_sizes": [heads, kv, kv + 1]}, "qkv"),
                           ({"gate_up_biases": [None, torch.zeros(inter + 1)]}, "gate or up bias"),
                           ({"down": torch.zeros(hidden, inter + 1)}, "down")]:
        with pytest.raises(RuntimeError, match=message):
            kernel.LayerStep(**{**good, **wrong})
