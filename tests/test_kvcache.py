"""The KV cache's capacity (knnssd/engine/kvcache.py): a cache made with a request's reach never holds more than
that, grows by doubling up to it, grows exactly as far as a write past it needs, and computes and rolls back as
an uncapped cache does; `request_reach` bounds what the real decoding loop writes, with every drafter."""

from __future__ import annotations

import pytest
import torch

import knnssd.engine.decoding as decoding
from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.engine.kvcache import HEADROOM, PreallocatedLayer, grown_capacity, new_cache, request_reach, rollback
from knnssd.errors import KnnSsdError
from tests.conftest import tiny_model
from tests.test_lossless import drafters_under_test


def buffers(cache) -> list[int]:
    """Each preallocated layer's buffer positions (0 before its first write)."""
    return [0 if layer.key_buffer is None else layer.key_buffer.shape[-2]
            for layer in cache.layers if isinstance(layer, PreallocatedLayer)]


def forward(model, cache, tokens: list[int], position: int) -> torch.Tensor:
    """The base model over `tokens` at `position` onward, writing to `cache`: hidden states (n, hidden)."""
    ids = torch.tensor([tokens])
    positions = torch.arange(position, position + len(tokens)).unsqueeze(0)
    with torch.inference_mode():
        return model.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).last_hidden_state[0]


def test_growth_without_and_with_a_capacity():
    assert grown_capacity(100) == 356 and grown_capacity(1000) == 2000  # as before: max(2 x end, end + HEADROOM)
    assert grown_capacity(100, capacity=150) == 150  # the prompt's first write reserves the reach, no more
    assert grown_capacity(1000, capacity=1500) == 1500 and grown_capacity(1000, capacity=5000) == 2000
    assert grown_capacity(1600, capacity=1500) == 1600  # a write past the capacity: exactly what it needs
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(KnnSsdError, match="capacity must be a positive number"):
            PreallocatedLayer(bad)


def test_a_long_prompt_reserves_its_reach_not_twice_itself():
    model = tiny_model("llama")
    prompt, max_new = [3 + i % 120 for i in range(300)], 20
    reach = request_reach(len(prompt), max_new)
    capped, uncapped = new_cache(model, capacity=reach), new_cache(model)
    forward(model, capped, prompt, 0)
    forward(model, uncapped, prompt, 0)
    assert set(buffers(capped)) == {reach} and reach < 2 * len(prompt)
    assert set(buffers(uncapped)) == {max(2 * len(prompt), len(prompt) + HEADROOM)}


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # mistral: every layer slides, none preallocated
def test_capped_cache_doubles_up_to_its_capacity_and_computes_and_rolls_back_as_before(family):
    """Steps of one to eight entries with rollbacks, on a capped and an uncapped cache: the same hidden states
    every step; the capped buffers 2 x the prompt, then the capacity (the doubling stopped there), never more;
    then a write past the capacity grows exactly to what it needs."""
    model = tiny_model(family, max_position_embeddings=1024)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 128, (300,), generator=generator).tolist()
    capacity = 700
    capped, uncapped = new_cache(model, capacity=capacity), new_cache(model)
    for cache in (capped, uncapped):
        forward(model, cache, prompt, 0)
    position, sizes = len(prompt), set()
    while position + 8 <= capacity:
        width = int(torch.randint(1, 9, (1,), generator=generator))
        tokens = torch.randint(3, 128, (width,), generator=generator).tolist()
        outputs = [forward(model, cache, tokens, position) for cache in (capped, uncapped)]
        assert torch.equal(outputs[0], outputs[1])
        kept = int(torch.randint(1, width + 1, (1,), generator=generator))  # accept some, reject the rest
        for cache in (capped, uncapped):
            rollback(cache, position + kept)
            assert {layer.get_seq_length() for layer in cache.layers if isinstance(layer, PreallocatedLayer)} \
                == {position + kept}
        position += kept
        sizes.update(buffers(capped))
    assert sorted(sizes) == [600, 700]  # max(2 x 300, 300 + HEADROOM), then min(2 x 601, capacity)
    tokens = [3 + i % 120 for i in range(capacity - position + 3)]  # past the capacity by 3
    outputs = [forward(model, cache, tokens, position) for cache in (capped, uncapped)]
    assert torch.equal(outputs[0], outputs[1])
    assert set(buffers(capped)) == {capacity + 3}
    rollback(capped, position)
    assert set(buffers(capped)) == {capacity + 3}  # a rollback is a length change, never a copy


def test_the_request_reach_bounds_what_the_decoding_loop_writes(monkeypatch):
    """Every drafter the loop serves (paths, layer skipping, wide trees), greedy, from a cache capped at the
    request's reach: the same tokens as uncapped, and no buffer ever past the reach (a write past it would grow
    the buffer beyond it, which this catches)."""
    model = tiny_model("llama")
    prompt = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    max_new = 40
    reach = request_reach(prompt.shape[1], max_new)
    made = []

    def recorded(model, capacity=None):  # what the loop asks for, recorded
        made.append((capacity, new_cache(model, capacity)))
        return made[-1][1]

    for name, drafter in drafters_under_test():
        with monkeypatch.context() as patch:
            patch.setattr(decoding, "new_cache", lambda model, capacity=None: new_cache(model))  # uncapped
            plain = generate(model, prompt, GenerationConfig(max_new_tokens=max_new), drafter).token_ids
        with monkeypatch.context() as patch:
            patch.setattr(decoding, "new_cache", recorded)
            capped = generate(model, prompt, GenerationConfig(max_new_tokens=max_new), drafter).token_ids
        assert capped == plain, name
        assert made[-1][0] == reach, name  # the loop caps its cache at the request's reach
        made[-1] = made[-1][1]
        assert 0 < max(buffers(made[-1])) <= reach, name
