"""The decoding loop's per-step hook, and the server's incremental text: multi-byte characters never split,
stop strings never partly sent."""

from __future__ import annotations

import pytest
import torch

from knnssd.engine.decoding import GenerationConfig, generate
from knnssd.engine.drafters import LayerSkipConfig, LayerSkipDrafter
from knnssd.engine.sampling import SamplingConfig
from knnssd.serve.text import TextStream
from knnssd.engine.skipset import SkipSet
from tests.conftest import tiny_model

PROMPT = torch.tensor([[5, 9, 17, 33, 5, 9, 17, 40]])


def drafter() -> LayerSkipDrafter:
    return LayerSkipDrafter(SkipSet.of(attn=[2, 3]), LayerSkipConfig(threshold=0.0, max_draft_tokens=4))


@pytest.mark.parametrize("use_drafter", [False, True])
def test_hook_sees_every_committed_token_and_changes_nothing(use_drafter):
    model = tiny_model("llama", eos_token_id=None)
    config = GenerationConfig(max_new_tokens=40)
    plain = generate(model, PROMPT, config, drafter() if use_drafter else None)
    steps: list[tuple[int, ...]] = []
    hooked = generate(model, PROMPT, config, drafter() if use_drafter else None,
                      on_tokens=lambda tokens: steps.append(tokens) is None)
    assert hooked.token_ids == plain.token_ids and hooked.finish_reason == plain.finish_reason == "length"
    assert [t for step in steps for t in step] == list(plain.token_ids)
    assert steps[0] == plain.token_ids[:1]  # the prefill's token comes alone, first
    assert len(steps) == 1 + plain.stats.verify_steps  # then one call per verify step


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.9, seed=3)])
def test_hook_returning_false_stops_after_that_step(sampling):
    model = tiny_model("llama", eos_token_id=None)
    config = GenerationConfig(max_new_tokens=40, sampling=sampling)
    full = generate(model, PROMPT, config, drafter())
    calls = []

    def stop_at_third(tokens):
        calls.append(tokens)
        return len(calls) < 3

    stopped = generate(model, PROMPT, config, drafter(), on_tokens=stop_at_third)
    assert stopped.finish_reason == "stopped" and len(calls) == 3
    assert stopped.token_ids == tuple(t for step in calls for t in step) == full.token_ids[:len(stopped.token_ids)]
    first_only = generate(model, PROMPT, config, drafter(), on_tokens=lambda tokens: False)
    assert first_only.token_ids == full.token_ids[:1] and first_only.finish_reason == "stopped"


def test_stop_at_the_last_token_is_length():
    model = tiny_model("llama", eos_token_id=None)
    result = generate(model, PROMPT, GenerationConfig(max_new_tokens=1), on_tokens=lambda tokens: False)
    assert result.finish_reason == "length" and len(result.token_ids) == 1


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A real byte-level BPE tokenizer with so few merges that multi-byte characters span several tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(["plain ascii text here"] * 4, vocab_size=270, min_frequency=1)
    return PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer)


TEXT = "né 😀 ok — 東京 done"


def test_multibyte_characters_are_never_split(byte_tokenizer):
    ids = byte_tokenizer(TEXT)["input_ids"]
    assert len(ids) > len(TEXT)  # characters really span several tokens
    assert any(byte_tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(len(ids)))  # decoded alone: split
    stream = TextStream(byte_tokenizer)
    pieces = [stream.push([token]) for token in ids]
    pieces.append(stream.finish())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == byte_tokenizer.decode(ids) == TEXT
    assert sum(1 for p in pieces if p) > 5  # handed out as it came, not all at the end


def test_stop_string_across_tokens_is_cut_and_never_sent(byte_tokenizer):
    ids = byte_tokenizer(TEXT)["input_ids"]
    stream = TextStream(byte_tokenizer, stops=("東京", "zzz"))
    pieces = []
    for token in ids:
        pieces.append(stream.push([token]))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert stream.stopped and "".join(pieces) == TEXT[:TEXT.index("東京")]
    assert not any("東" in piece for piece in pieces)


def test_no_stop_holds_nothing_back_at_the_end(byte_tokenizer):
    ids = byte_tokenizer("abc def")["input_ids"]
    stream = TextStream(byte_tokenizer, stops=("xyz",))
    text = "".join(stream.push([t]) for t in ids) + stream.finish()
    assert text == "abc def" and not stream.stopped
