"""Calibration end to end: data -> per-domain stores of the model's own outputs (Ray) -> per-domain search and
confirmation (Ray) -> embeddings (the store stage's own prefills, `pipeline.embedding_stage`) -> reduce -> held-out
check (Ray) -> bundle (with the stores) -> MLflow.

Every input is checked before Ray starts. Stage outputs land in `work_dir` as they finish (data.parquet,
step-costs/, search.json, embeddings.parquet, validation.json, the bundle folder), and the Optuna journal keeps
every finished trial, so a job that fails or is killed loses no finished work: run it again and it resumes.
A domain's store may also hold the user's own texts (`--corpus DOMAIN=PATH`, `pipeline.corpus`), added in the
store stage and noted in the bundle's calibration record (file name, sha256, texts, tokens), never copied.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from knnssd.errors import KnnSsdError
from knnssd.engine.models import check_model
from knnssd.engine.policy import describe_policy
from knnssd.engine.threads import resolve_threads
from pipeline.corpus import Corpus, check_corpora, corpus_record
from pipeline.data import CALIBRATION, HELD_OUT, DataConfig, domains_of, load_calibration_table, prompts_of
from pipeline.embedding_stage import run_embeddings
from pipeline.mix import MIX, mix_search, mixed_prompts
from pipeline.reduce import ReduceConfig, build_bundle_spec
from pipeline.search import prepare_study, study_name
from pipeline.space import SearchConfig
from pipeline.store_stage import build_stores
from pipeline.summary import flat_params, provenance
from pipeline.tasks import ModelSpec
from pipeline.validation import distinct_policies, validation_table
from knnssd.bundle import write_bundle
from registry.mlflow_store import BundleRegistry, check_bundle_name

@dataclass(frozen=True)
class CalibrationConfig:
    model: ModelSpec
    bundle_name: str
    data: DataConfig = DataConfig()
    search: SearchConfig = SearchConfig()
    reduce: ReduceConfig = ReduceConfig()
    work_dir: str = "calibration"
    storage: str | None = None
    tracking_uri: str | None = None
    publish: bool = True
    ray_address: str | None = None
    embed_chunk: int = 16
    mix: bool = True
    validate_prompts: int = 3
    signing_key: str | None = None  # a private key: the published bundle is signed (knnssd.bundle.signing)
    store_tokens: int = 128  # new tokens per calibration prompt in its domain's store (pipeline.stores)
    store_batch: int = 8  # prompts decoded together while building a store
    search_threads: int = 1  # torch threads (and Ray CPUs) of a CPU search task; see `run_searches`
    corpora: tuple[Corpus, ...] = ()  # the user's own texts added to a domain's store (`pipeline.corpus`)

    def __post_init__(self) -> None:  # the thread count every task decodes with, fixed on the driver
        object.__setattr__(self, "model", replace(self.model, threads=resolve_threads(self.model.threads)))
        if self.validate_prompts < 1:
            raise KnnSsdError("--validate-prompts must be >= 1", fix="use e.g. 3 held-out prompts per domain")
        if not 1 <= self.search_threads <= self.model.threads:
            raise KnnSsdError(f"--search-threads must be between 1 and the decoding threads ({self.model.threads}), "
                              f"got {self.search_threads}", fix="use 1 (each search task replays on one core)")
        if self.store_tokens < 1 or self.store_batch < 1:
            raise KnnSsdError(f"--store-tokens and --store-batch must be >= 1, got {self.store_tokens} and "
                              f"{self.store_batch}", fix="use e.g. --store-tokens 128 --store-batch 8")

    @property
    def costs_dir(self) -> str:
        return str(Path(self.work_dir).resolve() / "step-costs")

    @property
    def storage_url(self) -> str:
        return self.storage or str(Path(self.work_dir) / "optuna-journal.log")


@dataclass(frozen=True)
class CalibrationResult:
    bundle_folder: Path
    ref: str | None
    domains: tuple[dict[str, Any], ...]
    validation: dict[str, Any]
    seconds: float


def validate(config: CalibrationConfig) -> pa.Table:
    """Every check that needs no cluster: bundle name, model, data, corpora (their domains are the data's, none
    holds a held-out prompt). Returns the split calibration table."""
    check_bundle_name(config.bundle_name)
    check_model(config.model.name)
    table = load_calibration_table(config.data)
    if config.mix and MIX in domains_of(table):
        raise KnnSsdError(f"the data has a domain named {MIX!r}, the name of the study over all domains together",
                          fix=f"rename that domain (--merge {MIX}=other) or pass --no-mix")
    check_corpora(config.corpora, domains_of(table),
                  table.filter(pc.equal(table["split"], HELD_OUT))["prompt"].to_pylist())
    return table


def run_searches(config: CalibrationConfig, table: pa.Table, model: dict[str, Any],
                 log: Callable[[str], None], stores: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One study per domain, plus the mix study (all domains' prompts together) when `config.mix`: each prepared
    here (seeds, interrupted trials), run by `search.workers` workers, then confirmed in wall clock. `stores`:
    domain (and MIX) -> its `DomainStore`, which its suffix-tree trials may draft from (a domain without one
    never suggests use_store). A search task's resources: `pipeline.cluster.search_resources` (on one CPU node,
    `config.search_threads` CPUs, so N cores search N studies at once); confirmation's: every decoding thread."""
    import ray

    from pipeline.cluster import search_resources, task_resources
    from pipeline.tasks import confirm_domain, search_worker

    resources = task_resources(config.model.threads)
    lane, replay_threads = search_resources(config.model.threads, config.search_threads, log)
    studies = {domain: (prompts_of(table, domain, CALIBRATION), config.search) for domain in domains_of(table)}
    if config.mix:
        studies[MIX] = (mixed_prompts(table), mix_search(config.search, len(studies)))
    store = {domain: (stores or {}).get(domain) for domain in studies}
    names = {domain: study_name(model["model_hash"], domain, search, prompts, store[domain])
             for domain, (prompts, search) in studies.items()}
    for domain, (prompts, search) in studies.items():
        completed, stale = prepare_study(config.storage_url, names[domain], model["num_layers"], search,
                                         has_store=store[domain] is not None)
        log(f"search: [{domain}] study {names[domain]}: {completed} of {search.trials} trials completed"
            + (f", {stale} interrupted trial(s) marked failed" if stale else ""))
    workers = {}
    # the studies scoring the most prompts first (the mix), so parallel lanes finish near together
    started = sorted(studies, key=lambda d: -min(len(studies[d][0]), studies[d][1].prompts_per_trial))
    for domain in started:
        prompts, search = studies[domain]
        for worker in range(search.workers):
            ref = search_worker.options(**lane).remote(config.model, domain, prompts, search, config.storage_url,
                                                      names[domain], worker, config.costs_dir, store[domain],
                                                      replay_threads)
            workers[ref] = domain
    log(f"search: {len(studies)} studies ({', '.join(started)}), {config.search.trials} completed trials each, "
        f"{config.search.workers} worker(s) per study, each on {lane} (confirmation on {resources})")
    left = {domain: config.search.workers for domain in studies}
    confirming: dict[Any, str] = {}
    results = []
    while workers or confirming:
        ready, _ = ray.wait(list(workers) + list(confirming), num_returns=1)
        ref = ready[0]
        if ref in workers:
            domain = workers.pop(ref)
            done = ray.get(ref)
            left[domain] -= 1
            log(f"search: [{domain}] worker {done['worker']} ran {done['trials_run']} trials in "
                f"{done['seconds']:.0f} s")
            if left[domain] == 0:
                prompts, search = studies[domain]
                confirming[confirm_domain.options(**resources).remote(
                    config.model, domain, prompts, search, config.storage_url, names[domain],
                    config.costs_dir, store[domain])] = domain
            continue
        confirming.pop(ref)
        result = ray.get(ref)
        results.append(result)
        m = result["metrics"]
        log(f"confirm: [{result['domain']}] {describe_policy(result['policy'])}: predicted "
            f"{m['predicted_speedup']:.3f}, wall clock {m.get('searched_speedup', m['speedup']):.3f} "
            f"({len(results)}/{len(studies)}); {m.get('confirmation', 'no candidate')}")
    order = list(studies)
    return sorted(results, key=lambda r: order.index(r["domain"]))


def run_validation(config: CalibrationConfig, table: pa.Table, policies: dict[str, dict[str, Any]],
                   log: Callable[[str], None], stores: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every distinct policy on each domain's first `config.validate_prompts` held-out prompts. `stores`: a
    policy that drafts from a store drafts from its own domain's (MIX: the union) and, with store_scope "union" or
    "both", from the union of every domain's (`DomainStore.union_store`), as the runtime does; so two domains'
    equal policies are two policies where they draft from their own domain's store or warm table, and one where
    they draft from the union alone."""
    import ray

    from pipeline.cluster import task_resources
    from knnssd.engine.policy import uses_own_store, uses_store, uses_warm
    from pipeline.tasks import validate_domain

    def own_data(policy: dict[str, Any]) -> bool:  # drafts from its domain's store or successor table
        return uses_own_store(policy) or uses_warm(policy)

    distinct, alias = distinct_policies({name: {**policy, "store of": name} if own_data(policy) else policy
                                         for name, policy in policies.items()})
    unique = {name: policies[name] for name in distinct}
    drafting_from = {name: (stores or {}).get(name) for name, policy in unique.items()
                     if uses_store(policy) or uses_warm(policy)}
    resources = task_resources(config.model.threads)
    domains = [d for d in domains_of(table) if d in policies]
    log(f"held-out check: {len(unique)} distinct policies on up to {config.validate_prompts} held-out prompts "
        f"of each of {len(domains)} domains")
    refs = [validate_domain.options(**resources).remote(
        config.model, domain, prompts_of(table, domain, HELD_OUT)[: config.validate_prompts], unique,
        config.search.max_new_tokens, config.costs_dir, config.search.seed, drafting_from) for domain in domains]
    results = []
    for ref in refs:
        results.append(ray.get(ref))
        row = results[-1]["policies"][alias[results[-1]["domain"]]]
        log(f"held-out check: [{results[-1]['domain']}] own policy {row['speedup']:.3f} "
            f"({len(results)}/{len(refs)})")
    return validation_table(results, policies, alias)


def run_calibration(config: CalibrationConfig, log: Callable[[str], None] = print) -> CalibrationResult:
    """Run every stage; see the module docstring."""
    from pipeline.cluster import connect

    started = time.perf_counter()
    table = validate(config)
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, work / "data.parquet")
    log(f"data: {table.num_rows} prompts in {len(domains_of(table))} domains -> {work / 'data.parquet'}")
    connect(config.ray_address)
    model = identify(config, log)
    stores = build_stores(config.model, {d: prompts_of(table, d, CALIBRATION) for d in domains_of(table)},
                          config.store_tokens, config.store_batch, log, mix=MIX if config.mix else None,
                          corpora=config.corpora)
    everything = run_searches(config, table, model, log, stores)
    (work / "search.json").write_text(json.dumps(everything, indent=2))
    searches = [r for r in everything if r["domain"] != MIX]
    references = {MIX: {"policy": r["policy"], "metrics": r["metrics"]} for r in everything if r["domain"] == MIX}
    calibration = table.filter(pc.equal(table["split"], CALIBRATION))
    embeddings = run_embeddings(config.model, config.embed_chunk, calibration, stores, log)
    pq.write_table(calibration.append_column("embedding", pa.array(list(embeddings), pa.list_(pa.float32()))),
                   work / "embeddings.parquet")
    log(f"embed: {embeddings.shape[0]} prompts x {embeddings.shape[1]} -> {work / 'embeddings.parquet'}")
    policies = {r["domain"]: r["policy"] for r in everything}
    validation = run_validation(config, table, policies, log, stores)
    (work / "validation.json").write_text(json.dumps(validation, indent=2))
    spec = build_bundle_spec(
        model_id=config.model.name, model_hash=searches[0]["model_hash"], embeddings=embeddings,
        labels=calibration["domain"].to_pylist(), policies={r["domain"]: r["policy"] for r in searches},
        metrics={r["domain"]: r["metrics"] for r in searches}, config=config.reduce,
        prompt_format={"chat": config.model.chat},
        calibration={"search": asdict(config.search), "data": asdict(config.data),
                     "provenance": provenance(table, searches), "step_costs": model["costs"],
                     "stores": {"max_new_tokens": config.store_tokens, "batch": config.store_batch,
                                "corpora": [corpus_record(c, stores[c.domain]) for c in config.corpora]},
                     "validation": validation}, reference_policies=references,
        stores={domain: store.joined() for domain, store in stores.items() if domain != MIX},
        successors={d: s.table().table for d, s in stores.items() if d != MIX and s.successors is not None})
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    folder = write_bundle(spec, work / "bundles" / f"{config.bundle_name}-{stamp}")
    log(f"reduce: {spec.anchors.shape[0]} anchors, fallback beyond distance {spec.fallback_distance:.4f} -> {folder}")
    ref = None
    if config.publish:
        params = {**flat_params(config.model, config.data, config.search, config.reduce),
                  **spec.calibration["provenance"], **{f"corpus.{c['domain']}": f"{c['file']} {c['sha256'][:16]}"
                                                       for c in spec.calibration["stores"]["corpora"]}}
        published = BundleRegistry(config.tracking_uri).publish(folder, config.bundle_name, params=params,
                                                                signing_key=config.signing_key)
        ref = f"{published.name}@v{published.version}"
        registry = BundleRegistry(config.tracking_uri)
        log(f"publish: {ref} (run {published.run_id}) in {registry.tracking_uri}")
        log(f"compare bundles in the MLflow UI: {registry.ui_link(published.experiment_id)}"
            + ("" if registry.tracking_uri.startswith("http") else
               f" after `mlflow ui --backend-store-uri {registry.tracking_uri}`"))
    return CalibrationResult(bundle_folder=folder, ref=ref, domains=tuple(everything), validation=validation,
                             seconds=time.perf_counter() - started)


def identify(config: CalibrationConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """The model's hash and layer count from one task, which also times (or reads) the step costs of its node."""
    import ray

    from pipeline.cluster import task_resources
    from pipeline.tasks import identify_model

    started = time.perf_counter()
    model = ray.get(identify_model.options(**task_resources(config.model.threads)).remote(config.model,
                                                                                        config.costs_dir))
    relative = ", ".join(f"{w} tokens {c / model['costs']['verify'][0][0]:.2f}" for w, c in
                         zip(model["costs"]["widths"][1:], model["costs"]["verify"][0][1:]))
    log(f"model: hash {model['model_hash'][:12]}, {model['num_layers']} layers on {model['device']} "
        f"({model['threads']} threads); a verify step costs, in plain steps: {relative} "
        f"({time.perf_counter() - started:.0f} s)")
    return model
