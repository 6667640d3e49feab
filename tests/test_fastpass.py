"""The fast pass (`knnssd.engine.fastpass`: every layer's step from one loop) computes the layers one by one bit
for bit, is taken where a pass qualifies, and stands aside (the output unchanged) wherever something would see the
difference: a hook, hidden states or tuples asked for, a layer-skip draft, a layer whose one call is off, another
model family."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

from knnssd.engine import fastlayer, fastpass
from knnssd.engine.kernels import MAX_FAST_ROWS, accelerate, restore, transformers_kernels
from knnssd.engine.skipset import SkipSet
from knnssd.engine.sublayers import skip_sublayers
from knnssd.engine.tree import depths, tree_mask
from tests.conftest import tiny_model
from tests.test_batch_invariance import kernels_or_skip
from tests.test_fastlayer import assert_same, prefilled, run


@pytest.fixture
def passes(monkeypatch):
    """How many times the one loop ran (`fastpass._run_layers`)."""
    calls = [0]
    original = fastpass._run_layers

    def counted(*args):
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(fastpass, "_run_layers", counted)
    return calls


def accelerated(**config):
    kernels_or_skip()
    model = tiny_model("llama", num_layers=3, vocab_size=160, **config)
    accelerate(model)
    assert "forward" in vars(model.model) and fastpass.PASS_ATTRIBUTE in vars(model.model)
    return model


def both(model, tokens, positions, mask_of=None, **kwargs):
    """(one loop, layer by layer) results of one pass after the same 15-token prefill."""
    results = []
    for by_layer in (False, True):
        cache = prefilled(model, 15)
        mask = mask_of(cache) if mask_of else None
        if by_layer:
            with fastpass.layer_by_layer(model):
                results.append(run(model, cache, tokens, positions, mask))
        else:
            results.append(run(model, cache, tokens, positions, mask))
    return results


@pytest.mark.parametrize("config", [{}, {"attention_bias": True, "mlp_bias": True}])
def test_the_pass_is_the_layers_one_by_one(config, passes):
    """Identical logits and cache entries at widths 1, 7 and 32 and under a tree mask, the loop taken once a pass."""
    model = accelerated(**config)
    tokens = torch.randint(3, 160, (MAX_FAST_ROWS,), generator=torch.Generator().manual_seed(5)).tolist()
    parents = [-1, -1, 0, 1, 1, 2]
    cases = [(tokens[:width], list(range(15, 15 + width)), None) for width in (1, 7, MAX_FAST_ROWS)]
    cases.append((tokens[:7], (15 + torch.tensor([0] + depths(parents))).tolist(),
                  lambda cache: tree_mask(model, cache, parents, 15)))
    for chosen, positions, mask_of in cases:
        passes[0] = 0
        fast, by_layer = both(model, chosen, positions, mask_of)
        assert passes[0] == 1
        assert_same(fast, by_layer)


def test_positions_from_the_cache_as_the_class_computes_them(passes):
    model = accelerated()
    results = []
    for by_layer in (False, True):
        cache = prefilled(model, 15)
        with torch.inference_mode(), (fastpass.layer_by_layer(model) if by_layer else torch.no_grad()):
            results.append(model(input_ids=torch.tensor([[7, 8, 9]]), cache=cache, use_cache=True).logits)
    assert passes[0] == 1 and torch.equal(*results)


def one_pass(model, cache=None, **kwargs):
    cache = cache or prefilled(model, 15)
    with torch.inference_mode():
        return model(input_ids=torch.tensor([[7, 8]]), position_ids=torch.tensor([[15, 16]]), cache=cache,
                     use_cache=True, **kwargs)


def test_it_stands_aside_for_hooks_hidden_states_and_tuples(passes):
    model = accelerated()
    reference = one_pass(model).logits
    assert passes[0] == 1
    passes[0] = 0
    seen, cache = [], prefilled(model, 15)
    handle = model.model.layers[1].register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    try:
        assert torch.equal(one_pass(model, cache).logits, reference) and seen == [(1, 2, 64)]
    finally:
        handle.remove()
    seen, cache = [], prefilled(model, 15)
    handle = register_module_forward_hook(lambda module, args, out: seen.append(type(module).__name__))
    try:
        assert torch.equal(one_pass(model, cache).logits, reference)
    finally:
        handle.remove()
    assert seen.count("LlamaDecoderLayer") == 3
    assert passes[0] == 0
    cache = prefilled(model, 15)
    with torch.inference_mode():
        out = model.model(input_ids=torch.tensor([[7, 8]]), position_ids=torch.tensor([[15, 16]]), cache=cache,
                          use_cache=True, return_dict=False)
    assert isinstance(out, tuple) and passes[0] == 0
    assert torch.equal(model.lm_head(out[0]), reference)
    hidden = one_pass(model, output_hidden_states=True)
    assert len(hidden.hidden_states) == 4 and torch.equal(hidden.logits, reference)
    assert passes[0] == 0
    # transformers hooked the layers to capture hidden states: the pass stands aside from now on, output unchanged
    assert torch.equal(one_pass(model).logits, reference) and passes[0] == 0


def test_it_stands_aside_where_the_config_asks_for_hidden_states(passes):
    model = accelerated()
    cache = prefilled(model, 15)
    model.config.output_hidden_states = True  # read by the decoder model's own forward, called directly
    with torch.inference_mode():
        out = model.model(input_ids=torch.tensor([[7, 8]]), position_ids=torch.tensor([[15, 16]]), cache=cache,
                          use_cache=True)
    assert passes[0] == 0 and len(out.hidden_states) == 4


def test_it_stands_aside_for_drafts_switched_off_steps_and_embeddings(passes):
    model = accelerated()
    with skip_sublayers(model, SkipSet(attn=(1,))):
        drafted = one_pass(model).logits
        with fastpass.layer_by_layer(model):
            assert torch.equal(one_pass(model).logits, drafted)
    with fastlayer.calls_one_by_one(model):
        one_by_one = one_pass(model).logits
    assert passes[0] == 0
    assert torch.equal(one_pass(model).logits, one_by_one) and passes[0] == 1
    cache = prefilled(model, 15)
    with torch.inference_mode():
        embeds = model.model.embed_tokens(torch.tensor([[7, 8]]))
        out = model(inputs_embeds=embeds, position_ids=torch.tensor([[15, 16]]), cache=cache, use_cache=True)
    assert passes[0] == 1 and torch.equal(out.logits, one_by_one)


def test_install_only_on_llama_models_and_restore_takes_it_away():
    kernels_or_skip()
    qwen2 = tiny_model("qwen2", num_layers=2, vocab_size=160)
    accelerate(qwen2)
    assert fastlayer.saved_steps(qwen2) and "forward" not in vars(qwen2.model)  # Qwen2Model's forward differs
    llama = accelerated()
    with transformers_kernels(llama):
        assert "forward" not in vars(llama.model)
    assert "forward" in vars(llama.model)
    restore(llama)
    assert "forward" not in vars(llama.model) and fastpass.PASS_ATTRIBUTE not in vars(llama.model)
