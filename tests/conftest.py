"""Shared fixtures: tiny random models of each supported family, the real SmolLM2, Spec-Bench."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from knnssd.engine.kernels import accelerate
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

REPO_ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "qwen2", "mistral")


def tiny_model(family: str, seed: int = 0, num_layers: int = 4, vocab_size: int = 128, fast_kernels: bool = True,
               **overrides):
    """A random fp32 model of `family` with `num_layers` layers, small enough for unit tests, with the fast
    kernels `load_model` would choose (the default path) unless `fast_kernels` is False."""
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_cls, model_cls = classes[family]
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "mistral":
        kwargs["sliding_window"] = 16  # smaller than the test sequences: exercises the sliding-window cache
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    config._attn_implementation = "sdpa"
    model = model_cls(config).eval()
    accelerate(model, enabled=fast_kernels)
    return model


def spec_bench_path() -> Path:
    """Spec-Bench's question.jsonl: $KNNSSD_SPEC_BENCH, else ../shared/data/spec_bench/question.jsonl."""
    env = os.environ.get("KNNSSD_SPEC_BENCH")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"


def spec_bench_rows() -> list[dict]:
    path = spec_bench_path()
    if not path.is_file():
        pytest.skip(f"Spec-Bench not found at {path}; set KNNSSD_SPEC_BENCH")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct in fp32 on CPU (converted once into the knnssd cache)."""
    from knnssd.engine.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")
