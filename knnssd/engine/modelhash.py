"""A stable digest of a model's architecture and weights, so that a routing
bundle can be tied to the exact model it was calibrated on.

The digest covers the structural config fields and every tensor of the state
dict (names, shapes and values) rounded to bfloat16, so an fp32 and a bf16 load
of one checkpoint share a hash while any real change to the weights does not.
It is computed once per checkpoint and remembered in the cache, keyed by the
checkpoint files' names, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import PreTrainedModel

from knnssd.cachedir import cache_root, write_json_atomic

STRUCTURAL_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings", "sliding_window",
    "max_position_embeddings",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def compute_model_hash(model: PreTrainedModel) -> str:
    """sha256 hex digest of structural config and bf16-rounded weights (about 1 s per 100M parameters)."""
    digest = hashlib.sha256()
    config = {key: getattr(model.config, key, None) for key in STRUCTURAL_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        rounded = tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(rounded.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_fingerprint(folder: Path) -> str | None:
    """Digest of the weight and config files' names, sizes and mtimes; None if there are none."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        return None
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def cached_model_hash(model: PreTrainedModel, folder: Path | None, cache_dir: Path | None = None) -> str:
    """The model hash, read from the cache when `folder`'s checkpoint was hashed before."""
    fingerprint = checkpoint_fingerprint(folder) if folder is not None and folder.is_dir() else None
    if fingerprint is None:
        return compute_model_hash(model)
    record = cache_root(cache_dir) / "hashes" / f"{fingerprint}.json"
    if record.is_file():
        try:
            return str(json.loads(record.read_text())["model_hash"])
        except (ValueError, KeyError):
            pass  # a damaged record is recomputed below
    value = compute_model_hash(model)
    write_json_atomic(record, {"model_hash": value, "folder": str(folder)})
    return value
