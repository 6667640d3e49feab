"""The domain-shift study of a routing bundle: KNN-SSD against Self-SD(Fix), Self-SD(Mix), an oracle, plain
decoding and transformers' own assisted generation, on prompts held out from calibration.

    python jobs/evaluate.py --bundle smollm2-135m@v3 --data ../shared/data/spec_bench/question.jsonl
    ray job submit --working-dir . -- python jobs/evaluate.py --bundle smollm2-135m@v3 --data question.jsonl

With RAY_ADDRESS (as under `ray job submit`) or --address, the measurement runs as one Ray task (on a GPU where
the cluster has one); otherwise in this process. Without --data, the prompts come from the data the bundle was
calibrated on (its manifest records where); the held-out split is rebuilt with the calibration's seed, and
checked, before any model loads, against the data fingerprint the bundle records: a file with a prompt added,
removed or changed splits otherwise, and a prompt held out now may have been a calibration prompt whose own
output sits in a store (store-drafting methods would look their own future up), so it is refused. Results: a folder of tables, a plot and a report, and an MLflow run nested under
the bundle's own run (unless --no-log). See pipeline/study.py (the methods and the run) and
pipeline/report.py (the figures).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

from knnssd.cli.entry import ArgumentParser, add_engine_flags, add_trusted_key_flag, run_main  # noqa: E402
from knnssd.errors import KnnSsdError  # noqa: E402
from pipeline.evalconfig import PEERS, STREAMS, EvalConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph
    p.add_argument("--bundle", default=None,
                   help="registry reference (name, name@vN, name@alias) or folder (needed unless --rerender).")
    p.add_argument("--data", default=None,
                   help="prompt file (default: the bundle's calibration data). It must split exactly as the data "
                        "the bundle was calibrated on (the data fingerprint the bundle records), else the run is "
                        "refused before any model loads: pass that exact file, or re-calibrate on this one.")
    p.add_argument("--allow-unverified-data", action="store_true",
                   help="evaluate a bundle that records no data fingerprint (made before fingerprints were "
                        "recorded, or by hand), with a warning, instead of refusing it: its held-out prompts "
                        "cannot be checked against its stores. A fingerprint that differs is refused always.")
    p.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens,
                   help="tokens each method generates per prompt.")
    p.add_argument("--prompts-per-domain", type=int, default=None, help="held-out prompts per domain (default all).")
    p.add_argument("--streams", default=",".join(STREAMS), help="task, mixed or both.")
    p.add_argument("--fix-domains", default=None, help="domains whose policy runs as Self-SD(Fix) (default all; 'none' for none).")
    p.add_argument("--peers", default=",".join(EvalConfig.peers),
                   help=f"transformers' methods to time, of {','.join(PEERS)} (hf-early-exit is slow: about 0.2x "
                        "here, so opt-in), or 'none'.")
    p.add_argument("--lookup-tokens", type=int, default=EvalConfig.lookup_tokens, help="peers' prompt_lookup_num_tokens.")
    p.add_argument("--early-exit-layer", type=int, default=None, help="peers' assistant_early_exit (default L/2).")
    p.add_argument("--policy", action="append", default=[], metavar="NAME=JSON",
                   help="also run this draft policy for every prompt, as method NAME (repeatable; the report "
                        "gives KNN-SSD's verdict against it), e.g. --policy lookup='{\"kind\": \"prompt_lookup\"}'.")
    p.add_argument("--seed", type=int, default=EvalConfig.seed, help="seed of the mixed stream's shuffle.")
    p.add_argument("--ood-domains", default=None,
                   help="domains of the data the bundle was NOT calibrated on: their prompts run as a third, "
                        "out-of-distribution stream (fallback rate, routing, speedup).")
    p.add_argument("--rerender", default=None, metavar="DIR",
                   help="measure nothing: rebuild the tables, plot and report of an earlier run's folder.")
    p.add_argument("--out", default=None, help="output folder (default evaluation/<bundle>-<time>).")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
    add_trusted_key_flag(p)
    p.add_argument("--no-log", action="store_true", help="do not log the evaluation to MLflow.")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS; none: run here).")
    add_engine_flags(p, "every method")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda where there is one).")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on CUDA).")
    return p


def split_list(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip() and x.strip() != "none")


def named_policies(items: list[str]) -> tuple[tuple[str, dict], ...]:
    from knnssd.engine.policy import describe_policy, parse_policy

    pairs = []
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise KnnSsdError(f"--policy {item!r} is not NAME=JSON",
                              fix="""write e.g. --policy lookup='{"kind": "prompt_lookup"}'""")
        policy = parse_policy(text)
        describe_policy(policy)  # checks every field's name and type now, before any model loads
        pairs.append((name.strip(), policy))
    return tuple(pairs)


def evaluation_prompts(manifest: dict, data_path: str | None, per_domain: int | None,
                       ood_domains: tuple[str, ...] = (), allow_unverified: bool = False
                       ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The held-out prompts of the bundle's domains, split as calibration split them (checked against the
    bundle's data fingerprint: `check_held_out`); and the prompts of `ood_domains` (domains of the data the
    bundle was not calibrated on)."""
    from dataclasses import replace

    from pipeline.data import DataConfig, load_calibration_table
    from pipeline.study import held_out_prompts, ood_prompts

    calibration = manifest.get("calibration", {})
    recorded = dict(calibration.get("data") or {})
    if data_path is None and "data" not in calibration:
        raise KnnSsdError("the bundle does not record its calibration data", fix="pass --data PATH")
    recorded["domains"] = tuple(recorded.get("domains") or ())
    if data_path is not None:
        recorded["path"] = data_path
    config = DataConfig(**recorded)
    table = load_calibration_table(config)
    domains = [d["name"] for d in manifest["domains"]]
    check_held_out(table, domains, calibration, config.path or "(the built-in demo prompts)", allow_unverified)
    unseen = []
    if ood_domains:
        everything = load_calibration_table(replace(config, domains=()))
        unseen = ood_prompts(everything, domains, ood_domains, per_domain)
    return held_out_prompts(table, domains, per_domain), unseen


def check_held_out(table, domains: list[str], calibration: dict, source: str, allow_unverified: bool) -> None:
    """Refuse data whose split of the bundle's `domains` differs from the one calibration fingerprinted
    (`pipeline.data.check_fingerprint`); a bundle with no fingerprint is refused too, or with
    `allow_unverified` evaluated with a warning on stderr. Other domains of the file (an --ood-domains stream)
    are left out of the comparison: calibration never stored their outputs."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.data import check_fingerprint

    recorded = (calibration.get("provenance") or {}).get("data.fingerprint")
    if recorded is None:
        problem = ("the bundle records no data fingerprint, so its held-out prompts cannot be checked against the "
                   "prompts whose outputs fill its stores")
        if not allow_unverified:
            raise KnnSsdError(problem, fix="re-calibrate (calibration records the fingerprint), or pass "
                                           "--allow-unverified-data to evaluate anyway")
        print(f"warning: {problem}; evaluating anyway (--allow-unverified-data)", file=sys.stderr, flush=True)
        return
    check_fingerprint(table.filter(pc.is_in(table["domain"], pa.array(domains))), str(recorded), source)


def run_study(bundle: str, tracking_uri: str | None, device: str | None, dtype: str | None, data: str | None,
              config: EvalConfig, threads: int, fast_kernels: bool, trusted_key_pems: list[str]):
    """Read the bundle (verified against the driver's trusted keys, sent by content: a Ray task on another node
    has neither its environment nor its key files), pick and check the prompts, then load its model and run
    the study. Returns (manifest, prompts, rows)."""
    from knnssd.bundle.reading import read_bundle
    from knnssd.bundle.runtime import load_bundle
    from knnssd.bundle.signing import keys_from_contents, trusted_keys
    from knnssd.bundle.sources import fetch_bundle
    from pipeline.study import evaluate

    with keys_from_contents(trusted_key_pems) as keys:
        checked = trusted_keys(keys)
        manifest = read_bundle(fetch_bundle(bundle, tracking_uri, keys=checked), keys=checked).manifest
        prompts, unseen = evaluation_prompts(manifest, data, config.prompts_per_domain, config.ood_domains,
                                             config.allow_unverified_data)  # refused here, before any model loads
        runtime = load_bundle(bundle, tracking_uri=tracking_uri, device=device, dtype=dtype, threads=threads,
                              fast_kernels=fast_kernels, trusted_keys=keys)
    return runtime.bundle.manifest, prompts + unseen, evaluate(runtime, prompts, config,
                                                               log=lambda message: print(message, flush=True),
                                                               unseen=unseen)


def run_study_where_asked(args: argparse.Namespace, config: EvalConfig):
    """The study in this process, or as one Ray task (a GPU where the cluster has one) given an address."""
    from knnssd.bundle.signing import key_contents
    from knnssd.engine.threads import resolve_threads

    threads = resolve_threads(args.threads)
    call = (args.bundle, args.tracking_uri, args.device, args.dtype, args.data, config, threads,
            not args.no_fast_kernels, key_contents(args.trusted_key))
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        return run_study(*call)
    import ray

    from pipeline.cluster import connect, task_resources

    connect(args.address)
    task = ray.remote(max_retries=0)(run_study).options(**task_resources(threads))
    return ray.get(task.remote(*call))


def evaluate_command(args: argparse.Namespace) -> int:
    """Measure (or, with --rerender, only re-report), write the outputs, log them to MLflow."""
    from pipeline.cluster import check_job_paths

    check_job_paths({"--data": args.data, "--rerender": args.rerender}, {"--out": args.out or "evaluation"},
                    ("--tracking-uri", args.tracking_uri))
    config = EvalConfig(max_new_tokens=args.max_new_tokens, prompts_per_domain=args.prompts_per_domain,
                        streams=split_list(args.streams), peers=split_list(args.peers),
                        fix_domains=None if args.fix_domains is None else split_list(args.fix_domains),
                        lookup_tokens=args.lookup_tokens, early_exit_layer=args.early_exit_layer, seed=args.seed,
                        policies=named_policies(args.policy), ood_domains=split_list(args.ood_domains),
                        allow_unverified_data=args.allow_unverified_data)
    from pipeline.report import metric_key, read_rows, summarise, write_outputs

    if args.rerender:
        table = Path(args.rerender) / "per_prompt.csv"
        if not table.is_file():
            raise KnnSsdError(f"{table} does not exist", fix="pass the folder of an earlier run (its --out)")
        rows = read_rows(table)
        title = args.bundle or Path(args.rerender).resolve().name
        print("\n".join(write_outputs(rows, summarise(rows), args.rerender, title)))
        return 0
    if not args.bundle:
        raise KnnSsdError("no bundle to evaluate", fix="pass --bundle NAME@vN (or a bundle folder)")
    from knnssd.engine.threads import resolve_threads

    manifest, prompts, rows = run_study_where_asked(args, config)
    table = summarise(rows)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_.@" else "-" for c in Path(args.bundle).name)
    out = Path(args.out or Path("evaluation") / f"{safe}-{stamp}")
    report = write_outputs(rows, table, out, f"{manifest['model_id']} ({args.bundle})")
    print("\n" + "\n".join(report))
    if config.ood_domains:
        from knnssd.engine.policy import describe_policy

        print(f"(a prompt that falls back is decoded with the bundle's fallback policy: "
              f"{describe_policy(manifest['fallback_policy'])}, beyond cosine distance "
              f"{manifest['routing']['fallback_distance']:.4f})")
    print(f"\nresults: {out}")
    if not args.no_log:
        from registry.mlflow_store import BundleRegistry

        registry = BundleRegistry(args.tracking_uri)
        params = {**{k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
                     for k, v in asdict(config).items()},
                  "bundle": args.bundle, "data": args.data or "calibration data", "prompts": len(prompts),
                  "threads": resolve_threads(args.threads), "fast_kernels": not args.no_fast_kernels}
        metrics = {metric_key(r, figure): r[figure] for r in table
                   for figure in ("speedup", "speedup_low", "speedup_high", "decode_speedup", "prefill_share",
                                  "mean_accepted", "acceptance",
                                  "mean_verify_width", "tree_share", "no_draft_share", "identical",
                                  "routing_accuracy")}
        run_id = registry.log_evaluation(args.bundle, params, metrics, out)
        print(f"logged to MLflow run {run_id} in {registry.tracking_uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: evaluate_command(args))


if __name__ == "__main__":
    sys.exit(main())
