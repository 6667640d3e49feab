"""The layer-skipping model's one parallel pass over a trace: what a layer-skip draft would predict at every
position (`predict`), as `pipeline.replay`'s module docstring explains (exact for a draft's first token up to
rounding, approximate after it). A search keeps these per (prompt, skip set) (`pipeline.scoring.Predictions`),
and a new skip set's pass may start at its first skipped layer from a kept layer input (`layers_from`)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from knnssd.engine.kernels import transformers_kernels
from knnssd.errors import KnnSsdError
from knnssd.engine.kvcache import rollback
from knnssd.engine.skipset import SkipSet
from knnssd.engine.sublayers import decoder_layers, model_lock, skip_sublayers
from pipeline.traces import Trace


@dataclass(frozen=True)
class Prediction:
    """The skipping model's greedy choice after each committed token of a trace.

    tokens[i], confidence[i]: its argmax and top-1 probability from trace token i (at position
    len(prompt) + i), predicting token i + 1; one entry per token but the last.
    """

    tokens: tuple[int, ...]
    confidence: tuple[float, ...]


def sliding_window(model: PreTrainedModel) -> int | None:
    """The attention window every layer uses (None: full attention); mixed layers are refused."""
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or ())
    if len(kinds) > 1:
        raise KnnSsdError("this model mixes full and sliding-window attention layers, which replay does not model",
                          fix="calibrate it with wall-clock trials (a model with one attention kind replays)")
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def full_cache(model: PreTrainedModel, trace: Trace) -> DynamicCache:
    """The full model's keys and values over the prompt and every new token but the last: (prompt + n - 1)
    positions, in a plain cache (full layers, whatever the model's window, so any position can be read)."""
    ids = torch.tensor([list(trace.prompt) + list(trace.tokens[:-1])], device=model.device)
    cache = DynamicCache()
    with torch.inference_mode(), model_lock(model), transformers_kernels(model):
        model.model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device).unsqueeze(0),
                    cache=cache, use_cache=True)
    return cache


def replay_mask(prompt_length: int, queries: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(1, 1, queries, cached + queries) bool mask, cached = prompt_length + queries: query i, at position
    p = prompt_length + i, sees the cached keys of positions < p (within `window`) and its own new key only."""
    cached = prompt_length + queries
    position = torch.arange(prompt_length, cached, device=device).unsqueeze(1)  # (queries, 1)
    key = torch.arange(cached, device=device).unsqueeze(0)  # (1, cached)
    past = key < position
    if window is not None:
        past &= position - key < window
    own = torch.eye(queries, dtype=torch.bool, device=device)
    return torch.cat([past, own], dim=1)[None, None]


def predict(model: PreTrainedModel, trace: Trace, cache: DynamicCache, skip_set: SkipSet,
            inputs: list[torch.Tensor] | None = None) -> Prediction:
    """One parallel pass of the model skipping `skip_set` over the trace (see the module docstring); `cache` is
    `full_cache(model, trace)` and is left as it was.

    `inputs` (optional, read and extended in place): this trace's layer inputs with nothing skipped, inputs[L]
    (1, queries, hidden) the hidden states entering decoder layer L in this very pass. The decoder layers before
    the first one `skip_set` touches compute what they compute with nothing skipped, so the pass starts at the
    deepest captured layer up to that one, from its captured input (`layers_from`): the same layers see the same
    tensors, mask, positions and cache as in the whole pass, so the prediction is bit for bit the whole pass's.
    The pass captures the inputs of the layers it runs up to that first skipped one. Memory: 4 x layers x
    queries x hidden bytes per trace at most (fp32)."""
    return predict_all(model, [(trace, cache, inputs)], skip_set)[0]


@torch.inference_mode()
def predict_all(model: PreTrainedModel, prompts: Sequence[tuple[Trace, DynamicCache, list[torch.Tensor] | None]],
                skip_set: SkipSet) -> list[Prediction]:
    """`predict(model, trace, cache, skip_set, inputs)` of each (trace, cache, inputs) of `prompts`, the model
    set up for `skip_set` once for all of them (entering the kernels' and skipping blocks walks every module)."""
    with model_lock(model), skip_sublayers(model, skip_set), transformers_kernels(model):
        return [skipping_pass(model, trace, cache, skip_set, inputs) for trace, cache, inputs in prompts]


def skipping_pass(model: PreTrainedModel, trace: Trace, cache: DynamicCache, skip_set: SkipSet,
                  inputs: list[torch.Tensor] | None) -> Prediction:
    """`predict`'s pass, inside its blocks (the model already skipping `skip_set`, transformers' kernels)."""
    queries = len(trace.tokens) - 1
    if queries < 1:
        return Prediction(tokens=(), confidence=())
    cached = cache.get_seq_length()
    device = model.device
    ids = torch.tensor([list(trace.tokens[:-1])], device=device)  # (1, queries)
    positions = torch.arange(len(trace.prompt), len(trace.prompt) + queries, device=device).unsqueeze(0)
    mask = replay_mask(len(trace.prompt), queries, sliding_window(model), device)
    layers = decoder_layers(model)
    if getattr(model.config, "model_type", None) not in LATE_START_FAMILIES:
        inputs = None  # the whole pass, nothing kept
    first = min(skip_set.attn + skip_set.mlp, default=len(layers))  # layers < first: nothing skipped
    start = min(first, len(inputs) - 1) if inputs else 0
    feed = {"input_ids": ids} if start == 0 else {"inputs_embeds": inputs[start]}
    try:
        with layers_from(model, start), capturing_inputs(layers, first, inputs):
            hidden = model.model(**feed, position_ids=positions, attention_mask=mask, cache=cache,
                                 use_cache=True).last_hidden_state[0]  # (queries, hidden)
            logits = model.get_output_embeddings()(hidden)  # (queries, vocab)
    finally:
        rollback(cache, cached)
    confidence, tokens = logits.float().softmax(dim=-1).max(dim=-1)
    return Prediction(tokens=tuple(tokens.tolist()), confidence=tuple(confidence.tolist()))


# Families whose pass may start at a later layer (`layers_from`): their forward feeds `inputs_embeds` unscaled and
# runs each layer on the mask it is given. Qwen2 picks a layer's mask by its index in the (sliced) list, which is
# harmless here only because replay passes one 4-D mask tensor for every layer type; a family that scales its
# embeddings (Gemma) or keys per-layer settings by index otherwise replays the whole pass.
LATE_START_FAMILIES = ("llama", "qwen2", "mistral")


@contextmanager
def layers_from(model: PreTrainedModel, start: int) -> Iterator[None]:
    """Within the block the model's forward runs decoder layers start.. only (each keeps its own layer_idx, so
    it reads and writes its own cache layer); its input is then layer `start`'s (`inputs_embeds`)."""
    if start == 0:
        yield
        return
    base = model.model
    layers = base.layers
    base.layers = layers[start:]
    try:
        yield
    finally:
        base.layers = layers


@contextmanager
def capturing_inputs(layers: torch.nn.ModuleList, first: int, inputs: list[torch.Tensor] | None) -> Iterator[None]:
    """Within the block a forward appends to `inputs` the input hidden states of layers len(inputs)..`first`
    (those not captured yet, up to the first layer whose sub-layers are skipped); nothing when `inputs` is None."""
    if inputs is None:
        yield
        return
    wanted = range(len(inputs), min(first, len(layers) - 1) + 1)

    def capture(index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if len(inputs) == index:  # layers run in order: index is the next one missing
                inputs.append(args[0])
        return hook

    handles = [layers[index].register_forward_pre_hook(capture(index)) for index in wanted]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
