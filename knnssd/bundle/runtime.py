"""The runtime: `load_bundle("name@v3")` and routed generation.

    >>> runtime = load_bundle("smollm2-135m@v3")          # or @production, @latest, or a bundle folder
    >>> out = runtime.generate("Translate into French: good morning", max_new_tokens=64)
    >>> out.route.domain, out.route.distance, out.route.fallback, out.text

Per prompt: one prefill (which also yields the prompt embedding: no extra forward pass), a FAISS
nearest-anchor search, then the decoding loop with that domain's draft policy. A suffix-tree policy with
use_store drafts from its domain's store in the bundle (store_scope "own"), from the union of every domain's store
(derived at load, `union_store`; store_scope "union"), or per step from the better of the two (store_scope
"both"); the fallback policy and the mix reference (`reference_drafter("mix")`) draft from the union whatever
their scope (their own store is the union). A suffix-tree policy with use_warm starts
each generation's recycled successors from its domain's warm table in the bundle; the fallback and the mix
reference from every domain's table merged in domain order (`SuccessorTable.merged`: the table of all their
updates in that order, as the mix study's union store built it). Needs neither Ray nor Optuna;
MLflow only to fetch a bundle by registry reference (a bundle folder needs none).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from knnssd.bundle import signing
from knnssd.bundle import FALLBACK_KEY, Bundle, read_bundle, split_store, union_store
from knnssd.engine.decoding import GenerationConfig, GenerationResult, Generation, TokenHook, begin, run_to_end
from knnssd.engine.drafters import Drafter, SuccessorTable, SuffixStore
from knnssd.errors import KnnSsdError
from knnssd.engine.models import LoadedModel, load_model
from knnssd.engine.policy import drafter_from_policy, suffix_tree_config, uses_own_store, uses_union, uses_warm
from knnssd.engine.prompts import encode_prompt
from knnssd.bundle.routing import Route, Router
from knnssd.engine.sampling import SamplingConfig
from knnssd.bundle.sources import fetch_bundle
from knnssd.engine.sublayers import model_lock

LOG = logging.getLogger("knnssd")


@dataclass(frozen=True)
class RoutedResult:
    """One routed generation: the text, the loop's result (tokens, stats), where the prompt was routed,
    the policy applied, and the seconds routing took (embedding read-out plus FAISS search)."""

    text: str
    result: GenerationResult
    route: Route
    policy: dict[str, Any]
    routing_seconds: float


@dataclass(frozen=True)
class RoutedGeneration:
    """A routed request after its prefill, ready for the loop (`knnssd.engine.decoding.step`): its generation,
    where it was routed, the policy key it drafts with, and the seconds routing took."""

    generation: Generation
    route: Route
    key: str
    routing_seconds: float


class BundleRuntime:
    """A loaded model plus a verified routing bundle; `generate` routes each prompt.

    Safe to call from several threads: generation on one model is serialised by `model_lock(model)` (a
    re-entrant lock per model object), so concurrent calls give exactly the outputs of sequential ones and
    never see another call's skipped sub-layers. For parallel throughput, give each thread its own model."""

    def __init__(self, bundle: Bundle, loaded: LoadedModel) -> None:
        self.bundle = bundle
        self.loaded = loaded
        self.router = Router(index=bundle.index, anchor_domains=bundle.anchor_domains, domains=bundle.domains,
                             fallback_distance=bundle.fallback_distance)
        self._check_store_ids()
        self._check_successor_vocab()
        self._union_indexes: dict[tuple[int, int], SuffixStore] = {}  # (min_ngram, max_ngram) -> the union indexed
        self.drafters: dict[str, Drafter | None] = {
            name: self._drafter(policy, name) for name, policy in bundle.policies.items()}
        self.chat = bool(bundle.manifest.get("prompt_format", {}).get("chat", True))

    def _check_store_ids(self) -> None:
        vocab = getattr(self.loaded.model.config, "vocab_size", None)
        for domain, store in self.bundle.stores.items():
            if vocab is not None and store.size and int(store.max()) >= vocab:
                raise KnnSsdError(f"the store of domain {domain!r} in bundle {self.bundle.folder} holds token id "
                                  f"{int(store.max())}, outside the vocabulary of model {self.loaded.name} "
                                  f"({vocab} ids)", fix="use the bundle's own model, or recalibrate for this one")

    def _model_vocab(self) -> int | None:
        head = self.loaded.model.get_output_embeddings()
        return getattr(head, "out_features", None) or getattr(self.loaded.model.config, "vocab_size", None)

    def _check_successor_vocab(self) -> None:
        vocab = self._model_vocab()
        for domain, table in self.bundle.successors.items():
            if vocab is not None and table.shape[0] != vocab:
                raise KnnSsdError(f"the successor table of domain {domain!r} in bundle {self.bundle.folder} covers "
                                  f"{table.shape[0]} token ids, but model {self.loaded.name} has {vocab}",
                                  fix="use the bundle's own model, or recalibrate for this one")

    def successor_table(self, name: str) -> SuccessorTable | None:
        """The warm table the policy of `name` starts from: a domain's own; for "mix" or the fallback key every
        domain's merged in domain order. None where there is none."""
        if name in self.bundle.domains:
            table = self.bundle.successors.get(name)
            return None if table is None else SuccessorTable.of(table)
        self.store_arrays(name)  # the same names, refused the same way
        return SuccessorTable.merged([SuccessorTable.of(self.bundle.successors[d]) for d in self.bundle.domains
                                      if d in self.bundle.successors])

    def store_arrays(self, name: str) -> list[tuple[int, ...]] | None:
        """The token arrays the policy of `name` drafts from: a domain's own store; for "mix" (the mix reference)
        or the fallback key, the union of every domain's store. None where there is none."""
        if name in self.bundle.domains:
            store = self.bundle.stores.get(name)
        elif name in ("mix", FALLBACK_KEY):
            store = union_store(self.bundle.stores, self.bundle.domains) if self.bundle.stores else None
        else:
            raise KnnSsdError(f"bundle {self.bundle.folder} has no domain {name!r}",
                              fix=f"use one of {', '.join(self.bundle.domains)}, 'mix' or '{FALLBACK_KEY}'")
        return None if store is None else split_store(store)

    def union_index(self, policy: dict[str, Any]) -> SuffixStore | None:
        """The union of every domain's store (what "mix" and the fallback draft from) indexed for the n-gram sizes
        of suffix-tree `policy`, once per size range whatever the number of domains drafting from it; None
        without stores."""
        if not self.bundle.stores:
            return None
        config = suffix_tree_config(policy)
        key = (config.min_ngram, config.max_ngram)
        if key not in self._union_indexes:
            self._union_indexes[key] = SuffixStore.of(self.store_arrays("mix"), config)
        return self._union_indexes[key]

    def _own_store(self, policy: dict[str, Any], name: str) -> list[tuple[int, ...]] | SuffixStore | None:
        """What `name`'s store-drafting policy drafts from as its own store: a domain's arrays; for "mix" and the
        fallback, the shared union index."""
        return self.store_arrays(name) if name in self.bundle.domains else self.union_index(policy)

    def _drafter(self, policy: dict[str, Any], name: str) -> Drafter | None:
        """The drafter of `policy`, with `name`'s store where the policy drafts from it (store_scope own/both),
        the union of every store where it drafts from that (union/both), and `name`'s warm successor table where
        it starts from one (checked at load)."""
        successors = self.successor_table(name) if uses_warm(policy) else None
        if uses_warm(policy) and successors is None:
            raise KnnSsdError(f"the policy of {name!r} in bundle {self.bundle.folder} starts from a warm successor "
                              "table (use_warm), but the bundle ships none for it",
                              fix="rebuild the bundle with its successor tables (calibration writes them)")
        return drafter_from_policy(policy, self.loaded.num_layers,
                                   store=self._own_store(policy, name) if uses_own_store(policy) else None,
                                   successors=successors,
                                   union_store=self.union_index(policy) if uses_union(policy) else None)

    def reference_drafter(self, name: str = "mix") -> Drafter | None:
        """The drafter of reference policy `name` (the manifest's "reference_policies"; never routed to), the
        mix reference drafting from the union of every domain's store: the Self-SD(Mix) baseline."""
        references = self.bundle.manifest.get("reference_policies", {})
        if name not in references:
            raise KnnSsdError(f"bundle {self.bundle.folder} has no reference policy {name!r}",
                              fix=f"use one of {sorted(references) or 'none: calibrate with the mix study'}")
        return self._drafter(references[name]["policy"], "mix")

    def encode(self, prompt: str) -> torch.Tensor:
        """Prompt ids (1, T), formatted as at calibration (chat template or not)."""
        return encode_prompt(self.loaded.tokenizer, prompt, chat=self.chat)

    def encode_chat(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """Ids (1, T) of a conversation (`{"role", "content"}` dicts, as OpenAI's chat API sends them) through the
        model's chat template, ending with the assistant's generation prompt."""
        tokenizer = self.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise KnnSsdError(f"model {self.loaded.name} has no chat template, so chat messages cannot be formatted",
                              fix="send the formatted text to /v1/completions instead, or serve an instruction-tuned "
                                  "model")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)
        if not ids:
            raise KnnSsdError("the chat messages encode to no tokens", fix="send at least one message with text")
        return torch.tensor([ids], dtype=torch.long)

    @property
    def context_length(self) -> int | None:
        """The model's context in tokens (prompt plus new tokens), None where its config does not say."""
        return getattr(self.loaded.model.config, "max_position_embeddings", None)

    @staticmethod
    def describe(routed: RoutedResult) -> dict[str, Any]:
        """What routing did for one generation, JSON-ready: the routed domain, the cosine distance, whether the
        fallback policy was used, the policy's kind (None: plain decoding), and the loop's counts (drafted and
        accepted tokens, verify steps; see `knnssd.engine.stats`)."""
        stats = routed.result.stats
        return {"domain": routed.route.domain, "distance": routed.route.distance, "fallback": routed.route.fallback,
                "policy_kind": routed.policy.get("kind") if routed.policy else None,
                "drafted": stats.drafted_tokens, "accepted": stats.accepted_tokens, "verify_steps": stats.verify_steps}

    def start(self, ids: torch.Tensor, max_new_tokens: int = 128, sampling: SamplingConfig = SamplingConfig(),
              on_tokens: TokenHook | None = None) -> RoutedGeneration:
        """Prefill prompt ids (1, T), route the prompt, and return its generation with the routed domain's drafter,
        ready to be stepped alone or in a batch (`knnssd.engine.decoding.step`). Call under `model_lock`."""
        config = GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling)
        model = self.loaded.model
        started = begin(model, ids, config)
        start = time.perf_counter()
        route = self.router.route(started.state.embedding)
        key = FALLBACK_KEY if route.fallback else route.domain
        routing_seconds = time.perf_counter() - start
        generation = Generation(model, started.state, config, self.drafters[key], started.generator, started.clock,
                                on_tokens)
        return RoutedGeneration(generation=generation, route=route, key=key, routing_seconds=routing_seconds)

    def finish(self, routed: RoutedGeneration) -> RoutedResult:
        """The result of a generation `start` began, once it is done."""
        result = routed.generation.result()
        text = self.loaded.tokenizer.decode(list(result.token_ids), skip_special_tokens=True)
        return RoutedResult(text=text, result=result, route=routed.route, policy=self.bundle.policies[routed.key],
                            routing_seconds=routed.routing_seconds)

    def generate(self, prompt: str | torch.Tensor, max_new_tokens: int = 128,
                 sampling: SamplingConfig = SamplingConfig(), on_tokens: TokenHook | None = None) -> RoutedResult:
        """Route `prompt` (text, or ids (1, T) already formatted) and generate with its domain's policy.
        `on_tokens` sees each step's committed tokens and may stop generation (`knnssd.engine.decoding.TokenHook`)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        with model_lock(self.loaded.model):  # one generation at a time on this model, whatever the thread
            routed = self.start(ids, max_new_tokens, sampling, on_tokens)
            run_to_end(self.loaded.model, routed.generation)
        return self.finish(routed)


def load_bundle(
    ref: str,
    model: LoadedModel | None = None,
    tracking_uri: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_model_mismatch: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    fast_kernels: bool = True,
    trusted_keys: Sequence[str | os.PathLike[str]] | None = None,
) -> BundleRuntime:
    """Resolve `ref`, fetch and verify the bundle, load (or take) its model, check the model hash.

    Args:
        ref: "name", "name@latest", "name@v3", "name@<alias>", or a bundle folder.
        model: a model already loaded with `load_model`; default: the bundle's own model id.
        allow_model_mismatch: use the bundle although the model's hash differs from the bundle's.
        threads, fast_kernels: for the model load (see `knnssd.engine.models.load_model`).
        trusted_keys: public keys (PEM files) a bundle must be signed by (default: $KNNSSD_TRUSTED_KEYS, paths
            separated by os.pathsep); the signature is checked before anything in the bundle is read, so an
            unsigned or foreign bundle never names the model to load. With none, the bundle is loaded
            unauthenticated, with a warning (`knnssd.bundle.signing`).
    """
    keys = signing.trusted_keys(trusted_keys)
    bundle = read_bundle(fetch_bundle(ref, tracking_uri, cache_dir, keys=keys), keys=keys)
    if not bundle.authenticity.verified:
        LOG.warning("knnssd: bundle %s is %s", ref, bundle.authenticity.describe())
    loaded = model if model is not None else load_model(bundle.model_id, device=device, dtype=dtype,
                                                        threads=threads, fast_kernels=fast_kernels)
    if loaded.model_hash != bundle.model_hash and not allow_model_mismatch:
        raise KnnSsdError(
            f"bundle {ref!r} was calibrated on model {bundle.model_id} with hash {bundle.model_hash[:12]}, but the "
            f"model given ({loaded.name}) has hash {loaded.model_hash[:12]}",
            fix="use the bundle's own model, recalibrate for this one, or pass allow_model_mismatch=True "
                "(--allow-model-mismatch) to accept possibly lower speedups",
        )
    hidden = getattr(loaded.model.config, "hidden_size", None)
    if hidden != bundle.index.d:
        raise KnnSsdError(f"bundle {ref!r} routes {bundle.index.d}-dimensional embeddings, but the model given "
                          f"({loaded.name}) has hidden size {hidden}",
                          fix="use the bundle's own model, or recalibrate for this one")
    return BundleRuntime(bundle, loaded)
