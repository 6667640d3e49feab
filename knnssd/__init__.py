"""KNN-SSD: dynamic self-speculative decoding. The light core: no Ray, Optuna or MLflow.

Names are imported lazily (PEP 562), so `import knnssd.errors` (as the registry does) does not pull in torch
or the decoding loop.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GenerationConfig": "knnssd.decoding", "GenerationResult": "knnssd.decoding", "decode": "knnssd.decoding",
    "generate": "knnssd.decoding", "prefill": "knnssd.decoding",
    "LayerSkipConfig": "knnssd.drafters", "Drafter": "knnssd.drafters", "LayerSkipDrafter": "knnssd.drafters",
    "KnnSsdError": "knnssd.errors", "skip_sublayers": "knnssd.sublayers", "HybridDrafter": "knnssd.drafters",
    "PromptLookupConfig": "knnssd.drafters", "PromptLookupDrafter": "knnssd.drafters",
    "SuffixTreeConfig": "knnssd.drafters", "SuffixTreeDrafter": "knnssd.drafters",
    "LoadedModel": "knnssd.models", "load_model": "knnssd.models", "encode_prompt": "knnssd.prompts",
    "BundleRuntime": "knnssd.runtime", "load_bundle": "knnssd.runtime",
    "SamplingConfig": "knnssd.sampling", "SkipSet": "knnssd.skipset", "GenerationStats": "knnssd.stats",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'knnssd' has no attribute {name!r}")
