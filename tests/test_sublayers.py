import pytest
import torch

from knnssd.errors import KnnSsdError
from knnssd.engine.sublayers import SkippedAttention, SkippedMLP, decoder_layers, skip_sublayers
from knnssd.engine.skipset import SkipSet
from tests.conftest import FAMILIES, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_changes_output_and_restores_model(family):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (1, 10))
    before = logits(model, ids)
    modules_before = [(layer.self_attn, layer.mlp) for layer in decoder_layers(model)]
    with skip_sublayers(model, SkipSet.of(attn=[1, 2], mlp=[3])):
        layers = decoder_layers(model)
        assert isinstance(layers[1].self_attn, SkippedAttention) and isinstance(layers[3].mlp, SkippedMLP)
        assert not isinstance(layers[0].self_attn, SkippedAttention)
        inside = logits(model, ids)
    assert not torch.allclose(before, inside)
    assert [(layer.self_attn, layer.mlp) for layer in decoder_layers(model)] == modules_before
    assert torch.equal(logits(model, ids), before)


def test_model_restored_after_exception():
    model = tiny_model("llama")
    originals = [layer.self_attn for layer in decoder_layers(model)]
    with pytest.raises(RuntimeError, match="boom"):
        with skip_sublayers(model, SkipSet.of(attn=[0, 1, 2, 3])):
            raise RuntimeError("boom")
    assert [layer.self_attn for layer in decoder_layers(model)] == originals


def test_skipping_a_whole_layer_equals_removing_it():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 6))
    with skip_sublayers(model, SkipSet.of(attn=[2], mlp=[2])):
        skipped = logits(model, ids)
    del model.model.layers[2]
    model.config.num_hidden_layers = 3
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    assert torch.allclose(logits(model, ids), skipped, atol=1e-6)


def test_invalid_skip_sets_refused_before_any_change():
    model = tiny_model("qwen2")
    originals = [layer.mlp for layer in decoder_layers(model)]
    with pytest.raises(KnnSsdError, match="has 4 layers"):
        with skip_sublayers(model, SkipSet.of(mlp=[0, 9])):
            pass
    assert [layer.mlp for layer in decoder_layers(model)] == originals


def test_unsupported_architecture_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(KnnSsdError, match="'gpt2' is not supported.*llama, qwen2, mistral"):
        with skip_sublayers(model, SkipSet.of(attn=[0])):
            pass


def test_eager_attention_is_refused_with_a_clear_error():
    from knnssd.engine.decoding import GenerationConfig, generate
    from knnssd.engine.drafters import LayerSkipDrafter

    model = tiny_model("llama")
    model.config._attn_implementation = "eager"
    prompt = torch.randint(3, 128, (1, 5))
    with pytest.raises(KnnSsdError, match="needs SDPA attention.*'eager'"):
        generate(model, prompt, GenerationConfig(max_new_tokens=5), LayerSkipDrafter(SkipSet.of(attn=[1])))
    # skipping MLPs only keeps cache layers aligned: eager attention works, losslessly
    expected = model.generate(prompt, do_sample=False, max_new_tokens=8, pad_token_id=0)[0, 5:].tolist()
    got = generate(model, prompt, GenerationConfig(max_new_tokens=8), LayerSkipDrafter(SkipSet.of(mlp=[1, 2])))
    assert list(got.token_ids) == expected


def test_nested_skip_is_refused_and_the_model_stays_intact():
    model = tiny_model("llama")
    originals = [(layer.self_attn, layer.mlp) for layer in decoder_layers(model)]
    with skip_sublayers(model, SkipSet.of(attn=[1])):
        with pytest.raises(KnnSsdError, match="already skipping sub-layers"):
            with skip_sublayers(model, SkipSet.of(attn=[2], mlp=[1])):
                pass
    assert [(layer.self_attn, layer.mlp) for layer in decoder_layers(model)] == originals
    with skip_sublayers(model, SkipSet.of(attn=[2])):  # usable again once the first block is left
        pass


def test_overlapping_skip_from_another_thread_is_refused():
    """Enter A, enter B (another thread), exit A, exit B used to leave a stub in place for good."""
    import threading

    model = tiny_model("llama")
    originals = [(layer.self_attn, layer.mlp) for layer in decoder_layers(model)]
    errors = []

    def other_thread():
        try:
            with skip_sublayers(model, SkipSet.of(mlp=[0])):
                pass
        except KnnSsdError as exc:
            errors.append(exc)

    with skip_sublayers(model, SkipSet.of(attn=[1])):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])
    assert [(layer.self_attn, layer.mlp) for layer in decoder_layers(model)] == originals
