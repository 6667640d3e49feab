"""knnssd.engine.weights: the weight arena keeps every value, tie and parameter object; joins only adjacent
weights."""

from __future__ import annotations

import mmap

import torch
from torch import nn

from knnssd.engine.kernel_build import compiled_kernel
from knnssd.engine.weights import HUGE_PAGE, joined, place_weights, transparent_huge_pages
from tests.conftest import tiny_model


def test_placing_keeps_values_ties_and_parameter_objects():
    model = tiny_model("llama", num_layers=2, fast_kernels=False, tie_word_embeddings=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    objects = {name: p for name, p in model.named_parameters()}
    groups = [[layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]
              for layer in model.model.layers]
    placement = place_weights(model, groups)
    assert placement.groups == 2 and placement.bytes >= sum(t.numel() * 4 for t in before.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, p in model.named_parameters():
        assert p is objects[name] and torch.equal(p, before[name])
    starts = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(starts) == 1  # one arena
    first = min(p.data_ptr() for p in model.parameters())
    assert first % HUGE_PAGE == 0
    if transparent_huge_pages() == "never" or not hasattr(mmap, "MADV_HUGEPAGE"):
        assert not placement.huge_pages and "4 KB pages" in placement.describe()
    join = joined(groups[0])
    assert join is not None and join.matrix.shape == (64 + 32 + 32, 64) and join.sizes == (64, 32, 32)
    assert join.current(groups[0]) and not join.current(groups[0][::-1])
    kernel = compiled_kernel()
    if kernel is not None:  # one product over the joined matrix: the bits of one product per part
        for rows in (1, 2, 3, 7):
            x = torch.randn(rows, 64)
            assert torch.equal(kernel.rows_gemm(x, join.matrix),
                               torch.cat([kernel.rows_gemm(x, w.detach()) for w in groups[0]], dim=1))


def test_the_mode_never_is_read_not_trusted_to_madvise(tmp_path):
    (tmp_path / "enabled").write_text("always madvise [never]\n")
    assert transparent_huge_pages(str(tmp_path / "enabled")) == "never"
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert transparent_huge_pages(str(tmp_path / "enabled")) == "madvise"
    assert transparent_huge_pages(str(tmp_path / "missing")) == ""


def test_cache_buffers_on_huge_pages_decode_the_same_bits(monkeypatch):
    """Buffers from the arena (every buffer, with the threshold at 0) hold what library buffers hold."""
    from knnssd.engine import kvcache
    from knnssd.engine.decoding import GenerationConfig, generate

    model = tiny_model("llama", num_layers=2)
    prompt = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    config = GenerationConfig(max_new_tokens=24, eos_token_ids=())
    expected = generate(model, prompt, config).token_ids
    monkeypatch.setattr(kvcache, "HUGE_BUFFER_BYTES", 0)
    cache = kvcache.new_cache(model)
    with torch.inference_mode():
        model.model(input_ids=prompt, cache=cache, use_cache=True)
    assert cache.layers[0].key_buffer.untyped_storage().nbytes() >= kvcache.HUGE_PAGE  # from an arena
    assert generate(model, prompt, config).token_ids == expected


def test_joined_declines_what_is_not_adjacent():
    a, b = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4, 8))
    assert joined([a, b]) is None  # two storages
    whole = torch.randn(12, 8)
    first, second, third = (nn.Parameter(whole[i * 4:(i + 1) * 4]) for i in range(3))
    assert joined([first, second, third]) is not None
    assert joined([first, third]) is None  # a gap between them
    assert joined([second, first]) is None  # out of order
    wider = nn.Parameter(torch.randn(4, 9))
    assert joined([first, wider]) is None


def test_a_parameter_in_two_groups_is_refused():
    model = tiny_model("llama", num_layers=1, fast_kernels=False)
    q = model.model.layers[0].self_attn.q_proj.weight
    try:
        place_weights(model, [[q], [q]])
    except ValueError as error:
        assert "two groups" in str(error)
    else:
        raise AssertionError("place_weights accepted a parameter in two groups")
