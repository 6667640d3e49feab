"""Where a calibration search's trials spend their time: one domain's search worker, offline, trial by trial.

    python benchmarks/search_profile.py [--domain coding] [--trials 30] [--seed 0] [--threads 1]
                                        [--record FILE.json] [--check FILE.json] [--cprofile 25]
    python benchmarks/search_profile.py --compare REV [--rounds 2] [--domain coding] [--trials 30]

It reproduces what `pipeline.tasks.search_worker` does in the calibration job (`jobs/calibrate.py`) on the
built-in demo prompts, without Ray or MLflow:

1. the built-in model (SmolLM2-135M, fp32 on CPU, `--threads` torch threads: a search task runs on one);
2. the stores of the store stage (`pipeline.store_stage.build_stores`): each demo domain's calibration prompts
   (the job's seeded split, `pipeline.data`) decoded plainly by the engine's loop with their successor rows
   (`pipeline.store_decoding`, `--store-tokens` new tokens each), every domain's store carrying the union of
   all, and the union itself as the "mix" store; built once and kept in `--store-cache`;
3. the domain's workload as the worker builds it (`pipeline.tasks.search_workload`: traces from the store);
4. a fresh Optuna study in a journal file, as the job's (`pipeline.search.open_study`: the seeds and kind quota
   enqueued, TPE seeded by `--seed`), and `--trials` completed trials of the real objective (`make_objective`).

It prints seconds per trial by drafter kind: the objective's own time (the replay and its price) and the whole
trial's (with Optuna's sampling and storage). Trials are priced by a fixed step-cost table (`FIXED_COSTS`,
no timing: the figures depend only on the code, the model and the prompts) unless `--costs FILE` gives a
table `StepCosts.to_dict` wrote.

Exactness: the figures of each trial (predicted speedup, mean accepted tokens, acceptance, predicted seconds)
are what the search optimises, so a faster objective must give them bit for bit. `--record FILE` writes every
trial's policy and figures; `--check FILE` runs again and fails unless every trial (hence, since TPE is
deterministic given its seed and the values, the same policies in the same order) matches to the last bit.
`--compare REV` does both in one run: it extracts git revision REV (`git archive`) into a temporary folder and
runs the worker alternately on that code and on this checkout, `--rounds` times each (interleaved, so load on
the machine hits both alike), checks that every round's trials are identical, and prints before/after seconds
per trial by kind. Worker runs are subprocesses (`--worker`, internal): each imports `knnssd` and `pipeline`
from its `--code` folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

FIXED_COSTS = {  # a plausible 2-core CPU table (seconds); only its determinism matters here
    "contexts": [64, 1024], "widths": [1, 2, 3, 4, 6, 8, 11, 16],
    "verify": [[0.030, 0.024, 0.025, 0.026, 0.028, 0.030, 0.034, 0.041],
               [0.036, 0.030, 0.031, 0.033, 0.036, 0.039, 0.044, 0.053]],
    "draft_forward": [0.024, 0.029], "attention": [0.0003, 0.0005], "mlp": [0.0005, 0.0005],
    "threads": 1, "device": "cpu", "prefill": [0.06, 0.60]}
FIGURES = ("predicted_speedup", "mean_accepted_tokens", "acceptance_rate", "predicted_plain_seconds",
           "predicted_seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or path (default: the built-in)")
    p.add_argument("--domain", default="coding",
                   help="a demo domain (coding, math, translation, chat) or mix (all four, as the job's mix study)")
    p.add_argument("--trials", type=int, default=30, help="completed trials to run (the job runs 100)")
    p.add_argument("--seed", type=int, default=0, help="the study's sampler seed (SearchConfig.seed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a search task runs on 1)")
    p.add_argument("--store-tokens", type=int, default=128, help="new tokens per store output (the job's default)")
    p.add_argument("--store-cache", default=None,
                   help="JSON file the stores are kept in (default: one per model and --store-tokens in the temp dir)")
    p.add_argument("--costs", default=None, help="a step-cost table JSON (StepCosts.to_dict); default FIXED_COSTS")
    p.add_argument("--record", default=None, help="write every trial's policy and figures to this JSON file")
    p.add_argument("--check", default=None, help="fail unless the trials equal this --record file's, bit for bit")
    p.add_argument("--cprofile", type=int, default=0, help="print the top N functions of the trials by cumulative time")
    p.add_argument("--compare", default=None, metavar="REV",
                   help="before/after: run the worker on git revision REV and on this checkout, interleaved")
    p.add_argument("--rounds", type=int, default=2, help="with --compare: runs of each side")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: write one run's JSON here
    p.add_argument("--code", default=str(REPO_ROOT), help=argparse.SUPPRESS)  # internal: import the code from here
    args = p.parse_args(argv)
    if args.trials < 1 or args.threads < 1 or args.rounds < 1 or args.store_tokens < 1:
        p.error("--trials, --threads, --rounds and --store-tokens must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------------- stores


def default_store_cache(args: argparse.Namespace) -> Path:
    name = f"knnssd-search-profile-{Path(args.model).name}-{args.store_tokens}.json"
    return Path(args.store_cache) if args.store_cache else Path(tempfile.gettempdir()) / name


def build_store_cache(args: argparse.Namespace, path: Path) -> None:
    """Each demo domain's calibration prompts and their store (outputs, successor rows), as the store stage
    builds them, written to `path` as JSON."""
    from knnssd.engine.models import load_model
    from knnssd.engine.prompts import encode_prompt
    from pipeline.data import CALIBRATION, DataConfig, domains_of, load_calibration_table, prompts_of
    from pipeline.store_decoding import decode_store
    from pipeline.successors import model_vocab

    loaded = load_model(args.model, device="cpu", dtype="float32")
    table = load_calibration_table(DataConfig())
    invariant = loaded.kernels is not None and loaded.kernels.batch_invariant
    domains = {}
    for domain in domains_of(table):
        prompts = prompts_of(table, domain, CALIBRATION)
        started = time.perf_counter()
        ids = [encode_prompt(loaded.tokenizer, text, chat=True) for text in prompts]
        decoded = decode_store(loaded.model, ids, args.store_tokens, 8, invariant)
        print(f"store [{domain}]: {len(prompts)} prompts, {time.perf_counter() - started:.1f} s", flush=True)
        domains[domain] = {"prompts": prompts, "outputs": [list(o) for o in decoded.outputs],
                           "successors": [[list(r) for r in rows] for rows in decoded.successors]}
    path.write_text(json.dumps({"vocab": model_vocab(loaded.model), "domains": domains}))


def load_stores(path: Path) -> tuple[dict[str, list[str]], dict]:
    """(calibration prompts by study, store by study) as `pipeline.calibrate` hands them to the search workers:
    each domain's store with the union as its union_store, and "mix": the union itself with the mixed prompts."""
    from dataclasses import replace

    from pipeline.mix import MIX
    from pipeline.stores import DomainStore

    data = json.loads(path.read_text())
    stores = {domain: DomainStore(domain=domain, prompts=tuple(entry["prompts"]),
                                  outputs=tuple(tuple(o) for o in entry["outputs"]),
                                  successors=tuple(tuple(tuple(r) for r in rows) for rows in entry["successors"]),
                                  vocab=data["vocab"])
              for domain, entry in data["domains"].items()}
    union = DomainStore.union(list(stores.values()), MIX)
    stores = {domain: replace(store, union_store=union) for domain, store in stores.items()}
    per_domain = [list(entry["prompts"]) for entry in data["domains"].values()]
    prompts = {domain: list(entry["prompts"]) for domain, entry in data["domains"].items()}
    prompts[MIX] = [p for row in _zip_longest(per_domain) for p in row if p is not None]  # pipeline.mix.mixed_prompts
    stores[MIX] = union
    return prompts, stores


def _zip_longest(lists: list[list[str]]):
    import itertools

    return itertools.zip_longest(*lists)


# ---------------------------------------------------------------------------------------------------- worker


def run_worker(args: argparse.Namespace) -> dict:
    """One search worker's trials on `args.domain`: per trial its kind, policy, figures and seconds."""
    import optuna
    import torch

    from knnssd.cli.entry import quiet_loaders
    from knnssd.engine.models import load_model
    from knnssd.engine.prompts import encode_prompt
    import pipeline
    from pipeline.costs import StepCosts
    from pipeline.mix import MIX, mix_search
    from pipeline.search import enqueue_seeds, make_objective, open_study, run_worker as run_trials
    from pipeline.space import SearchConfig
    from pipeline.tasks import search_workload

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_loaders()
    prompts, stores = load_stores(default_store_cache(args))
    if args.domain not in stores:
        raise SystemExit(f"error: unknown domain {args.domain!r} (fix: choose one of {', '.join(stores)})")
    loaded = load_model(args.model, device="cpu", dtype="float32", threads=args.threads)
    costs = StepCosts.from_dict(json.loads(Path(args.costs).read_text()) if args.costs else FIXED_COSTS)
    config = SearchConfig(trials=args.trials, seed=args.seed)
    if args.domain == MIX:
        config = mix_search(config, len(stores) - 1)
    store = stores[args.domain]
    started = time.perf_counter()
    workload = search_workload(loaded.model, lambda text: encode_prompt(loaded.tokenizer, text, chat=True),
                               prompts[args.domain], config, store, lambda message: None)
    workload_seconds = time.perf_counter() - started
    folder = tempfile.TemporaryDirectory(prefix="knnssd-search-profile-")
    study = open_study(str(Path(folder.name) / "studies.journal"), "profile", config)  # as the job's default
    enqueue_seeds(study, loaded.num_layers, config, has_store=True)
    objective = make_objective(loaded.model, loaded.num_layers, workload, costs, config, lambda message: None, store)
    timed: dict[int, float] = {}

    def timed_objective(trial) -> float:
        begun = time.perf_counter()
        try:
            return objective(trial)
        finally:
            timed[trial.number] = time.perf_counter() - begun

    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    run_trials(study, timed_objective, config)
    total = time.perf_counter() - started
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(args.cprofile)
    trials = []
    for t in study.get_trials(deepcopy=False):
        span = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        trials.append({"number": t.number, "state": t.state.name, "kind": t.params.get("kind", "?"),
                       "policy": t.user_attrs.get("policy"), "value": t.value,
                       "figures": {k: t.user_attrs.get(k) for k in FIGURES},
                       "objective_seconds": timed.get(t.number), "trial_seconds": span})
    return {"code": str(Path(pipeline.__file__).resolve().parents[1]), "domain": args.domain,
            "prompts": len(workload.traces), "torch_threads": torch.get_num_threads(),
            "workload_seconds": workload_seconds, "total_seconds": total, "trials": trials}


def identity(run: dict) -> list:
    """What must not change: each trial's number, state, kind, policy and figures (floats compared exactly)."""
    return [(t["number"], t["state"], t["kind"], json.dumps(t["policy"], sort_keys=True),
             [t["figures"][k] for k in FIGURES], t["value"]) for t in run["trials"]]


def first_difference(a: dict, b: dict) -> str:
    for x, y in zip(identity(a), identity(b)):
        if x != y:
            return f"trial {x[0]}:\n  {x}\n  {y}"
    return f"trial counts differ: {len(a['trials'])} vs {len(b['trials'])}"


# ---------------------------------------------------------------------------------------------------- report


def per_kind(run: dict, field: str) -> dict[str, tuple[int, float]]:
    """kind -> (completed trials, mean seconds of `field`) over the completed trials, and "all"."""
    rows: dict[str, list[float]] = {}
    for t in run["trials"]:
        if t["state"] == "COMPLETE" and t[field] is not None:
            rows.setdefault(t["kind"], []).append(t[field])
            rows.setdefault("all", []).append(t[field])
    return {kind: (len(v), statistics.fmean(v)) for kind, v in rows.items()}


def print_table(runs: dict[str, list[dict]]) -> None:
    """Seconds per completed trial by kind, per side (mean over its rounds), objective and whole trial."""
    sides = list(runs)
    kinds = sorted({t["kind"] for rs in runs.values() for r in rs for t in r["trials"] if t["state"] == "COMPLETE"})
    header = f"{'kind':<14}{'trials':>7}" + "".join(f"{s + ' obj s':>14}{s + ' trial s':>16}" for s in sides)
    if len(sides) == 2:
        header += f"{'obj ratio':>11}"
    print(header)
    for kind in kinds + ["all"]:
        line, objs = "", []
        count = 0
        for side in sides:
            obj = statistics.fmean(per_kind(r, "objective_seconds").get(kind, (0, 0.0))[1] for r in runs[side])
            whole = statistics.fmean(per_kind(r, "trial_seconds").get(kind, (0, 0.0))[1] for r in runs[side])
            count = per_kind(runs[side][0], "objective_seconds").get(kind, (0, 0.0))[0]
            line += f"{obj:>14.4f}{whole:>16.4f}"
            objs.append(obj)
        if len(sides) == 2:
            line += f"{objs[0] / objs[1] if objs[1] else float('nan'):>10.2f}x"
        print(f"{kind:<14}{count:>7}" + line)
    for side in sides:
        totals = ", ".join(f"{r['total_seconds']:.1f}" for r in runs[side])
        print(f"{side}: study seconds per round {totals}; workload {runs[side][0]['workload_seconds']:.1f} s "
              f"({runs[side][0]['prompts']} prompts), code {runs[side][0]['code']}")


# ---------------------------------------------------------------------------------------------------- driver


def worker_command(args: argparse.Namespace, code: str, out: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", out, "--code", code,
               "--model", args.model, "--domain", args.domain, "--trials", str(args.trials), "--seed", str(args.seed),
               "--threads", str(args.threads), "--store-tokens", str(args.store_tokens),
               "--store-cache", str(default_store_cache(args))]
    return command + (["--costs", args.costs] if args.costs else []) + (
        ["--cprofile", str(args.cprofile)] if args.cprofile else [])


def run_side(args: argparse.Namespace, code: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(worker_command(args, code, out.name), check=True)
        return json.loads(Path(out.name).read_text())


def extract_revision(rev: str) -> str:
    """The tree of git revision `rev` in a new temporary folder (nothing in the repository changes)."""
    folder = tempfile.mkdtemp(prefix="knnssd-search-profile-")
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def compare(args: argparse.Namespace) -> int:
    old = extract_revision(args.compare)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    try:
        for round_ in range(args.rounds):
            order = [("before", old), ("after", str(REPO_ROOT))]
            for side, code in order if round_ % 2 == 0 else order[::-1]:
                print(f"round {round_ + 1}: {side} ({code})", flush=True)
                runs[side].append(run_side(args, code))
    finally:
        shutil.rmtree(old, ignore_errors=True)
    reference = runs["before"][0]
    same = all(identity(r) == identity(reference) for rs in runs.values() for r in rs)
    print(f"\n{args.domain}: {len(reference['trials'])} trials ({args.trials} completed wanted), seed {args.seed}, "
          f"{args.threads} torch thread(s), before = {args.compare}, after = this checkout")
    print_table(runs)
    if not same:
        bad = next(r for rs in runs.values() for r in rs if identity(r) != identity(reference))
        print(f"MISMATCH: trials differ from the first 'before' run at {first_difference(reference, bad)}")
        return 1
    print("identical: every round's trials have the same policies and bit-identical figures")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, args.code)
        Path(args.worker).write_text(json.dumps(run_worker(args)))
        return 0
    sys.path.insert(0, str(REPO_ROOT))
    cache = default_store_cache(args)
    if not cache.is_file():
        print(f"building the stores once into {cache}", flush=True)
        build_store_cache(args, cache)
    if args.compare:
        return compare(args)
    run = run_side(args, str(REPO_ROOT))
    print(f"\n{args.domain}: {len(run['trials'])} trials, seed {args.seed}, {args.threads} torch thread(s)")
    print_table({"this": [run]})
    if args.record:
        Path(args.record).write_text(json.dumps(run, indent=1))
        print(f"recorded {len(run['trials'])} trials in {args.record}")
    if args.check:
        expected = json.loads(Path(args.check).read_text())
        if identity(expected) != identity(run):
            print(f"MISMATCH against {args.check}: {first_difference(expected, run)}")
            return 1
        print(f"identical to {args.check}: same policies, bit-identical figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
