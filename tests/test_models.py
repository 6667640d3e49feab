"""Loading models by folder and built-in name; the model hash; clear errors for bad models."""

from __future__ import annotations

import pytest
import torch

from knnssd.errors import KnnSsdError
from knnssd.engine.modelhash import compute_model_hash
from knnssd.engine.models import load_model, resolve_dtype
from tests.conftest import tiny_model


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KNNSSD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def save_tiny(folder, family="llama", seed=0, **overrides):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(128)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", eos_token="t2").save_pretrained(folder)
    return model


def test_load_local_folder_and_hash_is_cached(tmp_path, cache_dir):
    original = save_tiny(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    assert loaded.num_layers == 4 and loaded.dtype == torch.float32
    assert loaded.model_hash == compute_model_hash(original)
    records = list((cache_dir / "hashes").glob("*.json"))
    assert len(records) == 1
    assert load_model(str(tmp_path / "m"), device="cpu").model_hash == loaded.model_hash


def test_hash_tracks_weights_not_dtype():
    a = tiny_model("llama", seed=0)
    assert compute_model_hash(a) == compute_model_hash(tiny_model("llama", seed=0).to(torch.bfloat16))
    assert compute_model_hash(a) != compute_model_hash(tiny_model("llama", seed=1))
    b = tiny_model("llama", seed=0)
    with torch.no_grad():
        b.model.layers[3].mlp.down_proj.weight[0, 0] += 0.5
    assert compute_model_hash(a) != compute_model_hash(b)


def test_unsupported_architecture_is_named(tmp_path, cache_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "g")
    with pytest.raises(KnnSsdError, match="'gpt2' model; knnssd supports llama, qwen2, mistral"):
        load_model(str(tmp_path / "g"), device="cpu")


def test_missing_folder_is_a_clear_error(tmp_path, cache_dir):
    with pytest.raises(KnnSsdError, match="does not exist or holds no config.json"):
        load_model(str(tmp_path / "nothing-here"), device="cpu")


def test_unknown_hub_id_offline_is_a_clear_error(cache_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KnnSsdError, match="not a built-in name"):
        load_model("no-such-org/no-such-model-xyz", device="cpu")


def test_bad_device_and_dtype():
    with pytest.raises(KnnSsdError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(KnnSsdError, match="CUDA is not available"):
            load_model("smollm2-135m", device="cuda")


@pytest.mark.slow
def test_builtin_smollm2(smollm2):
    assert smollm2.num_layers == 30
    assert smollm2.model.config.model_type == "llama"
    assert len(smollm2.model_hash) == 64
    assert (smollm2.model.config.vocab_size, smollm2.model.config.hidden_size) == (49152, 576)


@pytest.mark.slow
def test_two_processes_converting_the_builtin_model_at_once(tmp_path):
    """Both get a complete folder; the conversion happens once (file lock), nothing half-written stays."""
    import subprocess
    import sys

    code = ("from knnssd.engine.models import builtin_folder, builtin_model; "
            "print(builtin_folder(builtin_model('smollm2-135m')))")
    env = {**__import__("os").environ, "KNNSSD_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    folders = {out.strip() for out, _ in outputs}
    assert len(folders) == 1
    folder = tmp_path / "cache" / "models" / "smollm2-135m"
    assert str(folder) in folders and (folder / ".knnssd-complete").is_file()
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []
