"""KNN-SSD: dynamic self-speculative decoding. The light core: no Ray, Optuna or MLflow."""

from knnssd.decoding import GenerationConfig, GenerationResult, decode, generate, prefill
from knnssd.drafters import DraftConfig, Drafter, LayerSkipDrafter
from knnssd.errors import KnnSsdError
from knnssd.layerskip import skip_sublayers
from knnssd.models import LoadedModel, load_model
from knnssd.prompts import encode_prompt
from knnssd.sampling import SamplingConfig
from knnssd.skipset import SkipSet
from knnssd.stats import GenerationStats

__version__ = "0.1.0"

__all__ = [
    "DraftConfig", "Drafter", "GenerationConfig", "GenerationResult", "GenerationStats", "KnnSsdError",
    "LayerSkipDrafter", "LoadedModel", "SamplingConfig", "SkipSet", "decode", "encode_prompt", "generate",
    "load_model", "prefill", "skip_sublayers", "__version__",
]
