"""KNN-SSD: dynamic self-speculative decoding. The light core: no Ray, Optuna or MLflow.

Names are imported lazily (PEP 562), so `import knnssd.errors` (as the registry does) does not pull in torch
or the decoding loop.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(("GenerationConfig", "GenerationResult", "decode", "generate", "prefill"), "knnssd.engine.decoding"),
    **dict.fromkeys(("Drafter", "HybridDrafter", "LayerSkipConfig", "LayerSkipDrafter", "PromptLookupConfig",
                     "PromptLookupDrafter", "SuffixTreeConfig", "SuffixTreeDrafter"), "knnssd.engine.drafters"),
    "KnnSsdError": "knnssd.errors", "skip_sublayers": "knnssd.engine.sublayers",
    "LoadedModel": "knnssd.engine.models", "load_model": "knnssd.engine.models",
    "encode_prompt": "knnssd.engine.prompts", "SamplingConfig": "knnssd.engine.sampling",
    "SkipSet": "knnssd.engine.skipset", "GenerationStats": "knnssd.engine.stats",
    "BundleRuntime": "knnssd.bundle.runtime", "load_bundle": "knnssd.bundle.runtime",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'knnssd' has no attribute {name!r}")
