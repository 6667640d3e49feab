"""Helpers to build small real bundles for tests: a tiny saved model, prompts per domain, real embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from knnssd.engine.decoding import prefill
from knnssd.engine.models import LoadedModel, load_model
from knnssd.engine.sampling import SamplingConfig
from pipeline.reduce import ReduceConfig, build_bundle_spec
from knnssd.bundle import write_bundle

# Word-level prompts for the tiny test tokenizer (tokens t0..t127): two clearly different "domains".
TINY_PROMPTS = {
    "low": [" ".join(f"t{3 + (i + j) % 20}" for j in range(12)) for i in range(6)],
    "high": [" ".join(f"t{100 + (i * 3 + j) % 27}" for j in range(12)) for i in range(6)],
}
TINY_POLICIES = {
    "low": {"kind": "layer_skip", "skip_set": {"attn": [2, 3], "mlp": []}, "threshold": 0.0, "max_draft_tokens": 4},
    "high": {"kind": "layer_skip", "skip_set": {"attn": [3], "mlp": [1]}, "threshold": 0.0, "max_draft_tokens": 3},
}


def embed(loaded: LoadedModel, text: str) -> np.ndarray:
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    return prefill(loaded.model, ids, SamplingConfig(), None, lambda: 0.0).embedding.numpy()


def tiny_bundle(loaded: LoadedModel, folder: Path, tag: str = "", **spec_overrides) -> Path:
    texts = [(d, t) for d, ts in TINY_PROMPTS.items() for t in ts]
    embeddings = np.stack([embed(loaded, t) for _, t in texts])
    spec = build_bundle_spec(
        model_id=loaded.source, model_hash=loaded.model_hash, embeddings=embeddings,
        labels=[d for d, _ in texts], policies=TINY_POLICIES,
        metrics={"low": {"speedup": 1.1, "mean_accepted_tokens": 2.0}, "high": {"speedup": 0.9}},
        config=ReduceConfig(anchors_per_domain=2), prompt_format={"chat": False}, calibration={"tag": tag})
    if spec_overrides:
        from dataclasses import replace

        spec = replace(spec, **spec_overrides)
    return write_bundle(spec, folder)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> LoadedModel:
    """The tiny saved Llama of tests.test_models, loaded by path (module-scoped)."""
    from tests.test_models import save_tiny

    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_tiny(folder)
    return load_model(str(folder), device="cpu")
