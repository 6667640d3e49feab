"""Calibrate per-domain draft policies and publish a routing bundle.

    .venv/bin/python jobs/calibrate.py --smoke
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- "$PWD/.venv/bin/python" jobs/calibrate.py \
        --data "$PWD/question.jsonl" --work-dir "$PWD/calibration" --tracking-uri http://127.0.0.1:5000 --trials 100

Run directly without --address (and without RAY_ADDRESS), it starts a local Ray. With no --data, it calibrates
on the built-in demo prompts. Progress per domain and trial while it runs; a summary table at the end; then
(unless --no-final-demo) it loads the bundle it published and answers one held-out prompt per domain through it.

Under `ray job submit --working-dir .` the job runs on the head node in Ray's throwaway copy of that folder, with the
head node's environment. So: run it with the venv's python by absolute path (`-- "$PWD/.venv/bin/python"
jobs/calibrate.py`: `.venv` is never uploaded, and a bare `python` is whatever the head's PATH finds), and give
every path absolutely. Ray does not tell the job the folder it was submitted from, so relative paths cannot be
resolved for the user; instead, before any work, the job refuses (`pipeline.cluster.check_job_paths`) a relative
--data, --model, --signing-key or --corpus file that does not exist in the copy, a relative --work-dir or
--storage (the default --work-dir too: the resume state would be deleted with the job), and, unless --no-publish,
a missing or relative file tracking store (the default one included: the bundle would be published into the
copy). Each error names the flag and its absolute form; the tracking store to use is an MLflow server
(`--tracking-uri http://HOST:PORT`).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir

REQUIRED = ("torch", "transformers", "pyarrow", "ray", "optuna", "mlflow")  # the calibrate extra's imports
if __name__ == "__main__" and (missing := [m for m in REQUIRED if importlib.util.find_spec(m) is None]):
    print(f"error: {sys.executable} has no {', '.join(missing)}: this is not the project's Python (under `ray job "
          "submit`, a bare `python` is the one on the head node's PATH) (fix: run the job with the venv's python, "
          'e.g. `ray job submit ... -- "$PWD/.venv/bin/python" jobs/calibrate.py ...`, or install the project '
          'there: pip install -e ".[calibrate]")', file=sys.stderr)
    sys.exit(2)

from knnssd.cli.entry import ArgumentParser, add_engine_flags, run_main  # noqa: E402
from knnssd.errors import KnnSsdError  # noqa: E402
from knnssd.bundle.signing import check_signing_key  # noqa: E402
from pipeline.calibrate import CalibrationConfig  # noqa: E402
from pipeline.cluster import check_job_paths  # noqa: E402
from pipeline.corpus import MAX_CORPUS_STORE_TOKENS, parse_corpus_flag, read_corpus  # noqa: E402
from pipeline.data import SPEC_BENCH_MT_CATEGORIES, DataConfig  # noqa: E402
from pipeline.reduce import ReduceConfig  # noqa: E402
from pipeline.space import SEARCHABLE_KINDS, SearchConfig  # noqa: E402
from pipeline.tasks import ModelSpec  # noqa: E402

SMOKE = {"trials": 4, "prompts_per_trial": 2, "confirm_prompts": 2, "confirm_candidates": 2, "validate_prompts": 1,
         "max_new_tokens": 12, "max_per_domain": 6, "store_tokens": 16}


def parse_pairs(text: str | None, flag: str) -> dict[str, str]:
    pairs = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise KnnSsdError(f"{flag} item {item!r} is not KEY=VALUE", fix=f"write e.g. {flag} a=b,c=d")
        pairs[key.strip()] = value.strip()
    return pairs


def default_bundle_name(model: str) -> str:
    """A registry-safe name from a model id or path: its last component, odd characters replaced."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name).strip("-.")
    return name or "bundle"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph
    p.add_argument("--model", default="smollm2-135m",
                   help="Hugging Face id, local folder, or the built-in smollm2-135m.")
    p.add_argument("--data", default=None, help="Spec-Bench/JSONL/Parquet file; default: built-in demo prompts.")
    p.add_argument("--columns", default=None, help="column mapping, e.g. domain=category,prompt=text.")
    p.add_argument("--merge", default=None, help="rename domains, e.g. writing=chat,roleplay=chat.")
    p.add_argument("--merge-mt-bench", action="store_true", help="merge Spec-Bench's 8 MT-bench categories as 'chat'.")
    p.add_argument("--domains", default=None, help="comma-separated domains to calibrate (after merging).")
    p.add_argument("--bundle-name", default=None, help="registered bundle name (default: the model name).")
    p.add_argument("--trials", type=int, default=SearchConfig.trials,
                   help="completed trials per domain study (each replayed over plain decoding's output and priced).")
    p.add_argument("--prompts-per-trial", type=int, default=SearchConfig.prompts_per_trial,
                   help="the most calibration prompts each trial is scored on: a domain with fewer scores on "
                        "every one it has, each traced from its store's plain output (no decoding in the search).")
    p.add_argument("--confirm-candidates", type=int, default=SearchConfig.confirm_candidates,
                   help="best distinct policies per domain re-measured in wall clock before one is chosen.")
    p.add_argument("--confirm-prompts", type=int, default=SearchConfig.confirm_prompts,
                   help="calibration prompts the candidates are timed on in wall clock (default: %(default)s).")
    p.add_argument("--confirm-rounds", type=int, default=SearchConfig.confirm_rounds,
                   help="the most rounds of confirmation timings (default: %(default)s): another round runs while "
                        "the candidate fastest in wall clock is not faster than the best predicted one beyond the "
                        "timings' spread, and after the last the best predicted one is kept.")
    p.add_argument("--kind-share", type=float, default=SearchConfig.kind_share,
                   help="each drafter kind's guaranteed share of the trials (its first trials are enqueued with "
                        "the kind fixed), so the search cannot settle on one kind before trying the others.")
    p.add_argument("--workers-per-domain", type=int, default=SearchConfig.workers,
                   help="Ray workers running each domain's study at once (one Optuna storage; use an RDB URL "
                        "in --storage across machines).")
    p.add_argument("--validate-prompts", type=int, default=CalibrationConfig.validate_prompts,
                   help="held-out prompts per domain for the final check of every policy.")
    p.add_argument("--max-new-tokens", type=int, default=SearchConfig.max_new_tokens,
                   help="tokens generated per prompt in trials, confirmation and the held-out check.")
    p.add_argument("--store-tokens", type=int, default=CalibrationConfig.store_tokens,
                   help="new tokens of the model's own greedy output kept per calibration prompt in its domain's "
                        "store (every calibration prompt is used; suffix_tree policies with use_store draft from "
                        "it; the bundle ships it).")
    p.add_argument("--search-threads", type=int, default=CalibrationConfig.search_threads,
                   help="torch threads, and Ray CPUs, of each search task on CPUs (default: %(default)s): a trial's "
                        "replay is mostly one Python thread, so on N cores N studies search at once; trials are "
                        "still priced for --threads, and wall-clock timings still use --threads cores alone.")
    p.add_argument("--store-batch", type=int, default=CalibrationConfig.store_batch,
                   help="calibration prompts decoded together (one batched pass a step, plain decoding's exact output) "
                        "while building a store.")
    p.add_argument("--corpus", action="append", default=None, metavar="DOMAIN=PATH",
                   help="add your own texts to DOMAIN's store (repeatable, one file per domain): a JSONL file, one "
                        "text a line (a JSON string or an object with a \"text\" field), tokenised as plain text "
                        f"(at most {MAX_CORPUS_STORE_TOKENS:,} tokens a domain). DOMAIN is one of the data's "
                        "domains after --merge and --domains; no text may contain a held-out prompt. The bundle "
                        "ships the tokens and notes the file's name and sha256.")
    p.add_argument("--max-per-domain", type=int, default=None, help="use at most N prompts per domain.")
    p.add_argument("--held-out-fraction", type=float, default=0.25,
                   help="share of each domain's prompts held out for the final check and evaluation.")
    p.add_argument("--anchors-per-domain", type=int, default=ReduceConfig.anchors_per_domain,
                   help="k-means anchors per domain.")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random"], help="Optuna sampler.")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, the sampler and k-means.")
    p.add_argument("--min-skip-ratio", type=float, default=SearchConfig.min_skip_ratio,
                   help="layer-skip trials skipping a smaller share of sub-layers are pruned.")
    p.add_argument("--max-skip-ratio", type=float, default=SearchConfig.max_skip_ratio,
                   help="layer-skip trials skipping a larger share of sub-layers are pruned.")
    p.add_argument("--min-speedup", type=float, default=SearchConfig.min_speedup,
                   help="a domain whose best trial is slower than this gets plain decoding (0 keeps every policy).")
    p.add_argument("--policies", default=",".join(SEARCHABLE_KINDS),
                   help="drafter kinds the search may choose per domain (comma-separated).")
    p.add_argument("--no-mix", action="store_true",
                   help="skip the mix study (one policy searched on all domains together; evaluate.py's Self-SD(Mix)).")
    p.add_argument("--work-dir", default="calibration", help="stage outputs, the Optuna journal and bundle folders.")
    p.add_argument("--storage", default=None, help="Optuna storage: journal file path or RDB URL "
                                                   "(default: WORK_DIR/optuna-journal.log).")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray).")
    p.add_argument("--no-publish", action="store_true", help="write the bundle folder only.")
    p.add_argument("--signing-key", default=None, metavar="PATH",
                   help="sign the published bundle with this private key (from `knnssd keys generate`), so that "
                        "users who trust its public key (--trusted-key) can verify it; unsigned without it.")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template to prompts.")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda where the worker has one).")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on CUDA).")
    add_engine_flags(p, "every trial (and each Ray task asks for as many CPUs)")
    p.add_argument("--smoke", action="store_true", help="a tiny search (about two minutes on 2 CPU cores).")
    p.add_argument("--no-final-demo", action="store_true",
                   help="do not answer a held-out prompt per domain through the published bundle.")
    return p


def config_from_args(args: argparse.Namespace) -> CalibrationConfig:
    if args.smoke:  # smoke sizes wherever the user kept the default
        defaults = build_parser()
        for key, value in SMOKE.items():
            if getattr(args, key) == defaults.get_default(key):
                setattr(args, key, value)
    merge = parse_pairs(args.merge, "--merge")
    if args.merge_mt_bench:
        merge.update({category: "chat" for category in SPEC_BENCH_MT_CATEGORIES})
    data = DataConfig(path=args.data, columns=parse_pairs(args.columns, "--columns"), merge=merge,
                      domains=tuple(d for d in (args.domains or "").split(",") if d),
                      held_out_fraction=args.held_out_fraction, seed=args.seed, max_per_domain=args.max_per_domain)
    search = SearchConfig(trials=args.trials, prompts_per_trial=args.prompts_per_trial,
                          confirm_candidates=args.confirm_candidates, confirm_rounds=args.confirm_rounds,
                          confirm_prompts=args.confirm_prompts,
                          workers=args.workers_per_domain, kind_share=args.kind_share,
                          max_new_tokens=args.max_new_tokens, sampler=args.sampler, seed=args.seed,
                          min_skip_ratio=args.min_skip_ratio, max_skip_ratio=args.max_skip_ratio,
                          min_speedup=args.min_speedup,
                          kinds=tuple(k.strip() for k in args.policies.split(",") if k.strip()))
    return CalibrationConfig(
        model=ModelSpec(name=args.model, device=args.device, dtype=args.dtype, chat=not args.no_chat,
                        threads=args.threads, fast_kernels=not args.no_fast_kernels),
        bundle_name=args.bundle_name or default_bundle_name(args.model), data=data, search=search,
        reduce=ReduceConfig(anchors_per_domain=args.anchors_per_domain, seed=args.seed),
        work_dir=args.work_dir, storage=args.storage, tracking_uri=args.tracking_uri, publish=not args.no_publish,
        ray_address=args.address, mix=not args.no_mix, validate_prompts=args.validate_prompts,
        store_tokens=args.store_tokens, store_batch=args.store_batch, search_threads=args.search_threads,
        corpora=tuple(read_corpus(*parse_corpus_flag(item)) for item in args.corpus or ()),
        signing_key=str(check_signing_key(args.signing_key)) if args.signing_key else None)


def check_paths_for_ray_job(args: argparse.Namespace) -> None:
    """Under `ray job submit`, refuse paths that point into the job's throwaway working copy (module docstring)."""
    model = args.model if args.model.startswith(("./", "../")) else None  # a hub id or built-in name is no path
    for domain, path in map(parse_corpus_flag, args.corpus or ()):
        try:
            check_job_paths(inputs={"--corpus": str(path)}, outputs={}, tracking=None)
        except KnnSsdError as error:  # said in the flag's DOMAIN=PATH form
            raise KnnSsdError(error.problem.replace(f"--corpus {path}", f"--corpus {domain}={path}", 1),
                              fix=(error.fix or "").replace('--corpus "', f'--corpus {domain}="', 1)) from None
    check_job_paths(inputs={"--data": args.data, "--model": model, "--signing-key": args.signing_key},
                    outputs={"--work-dir": args.work_dir, "--storage": args.storage},
                    tracking=None if args.no_publish else ("--tracking-uri", args.tracking_uri))


def calibrate_command(args: argparse.Namespace) -> int:
    """Run the calibration the arguments describe, print its summary, then the final demo."""
    check_paths_for_ray_job(args)
    config = config_from_args(args)
    from pipeline.calibrate import run_calibration
    from pipeline.summary import summary_table

    result = run_calibration(config)
    print("\n" + summary_table(result.domains, result.validation))
    print(f"\nbundle: {result.bundle_folder}" + (f"  published as {result.ref}" if result.ref else ""))
    print(f"calibration took {result.seconds:.0f} s")
    if result.ref and not args.no_final_demo:
        final_demo(result.ref, config, Path(config.work_dir))
    return 0


def final_demo(ref: str, config, work_dir: Path) -> None:
    """Load the published bundle and answer one held-out prompt per domain through it."""
    import pyarrow.parquet as pq

    from knnssd.engine.decoding import GenerationConfig, generate, warm_up
    from knnssd.bundle.runtime import load_bundle
    from pipeline.data import HELD_OUT, domains_of, prompts_of

    runtime = load_bundle(ref, tracking_uri=config.tracking_uri, device=config.model.device,
                          dtype=config.model.dtype, threads=config.model.threads,
                          fast_kernels=config.model.fast_kernels)
    table = pq.read_table(work_dir / "data.parquet")
    print(f"\nrouting one held-out prompt per domain through {ref} (policy 'none' = plain decoding, so its")
    print("speedup is run-to-run noise around 1):")
    print(f"{'true domain':<16}{'routed to':<16}{'distance':>9}{'policy':>14}{'speedup':>9}  identical  answer")
    warm_up(runtime.loaded.model, runtime.encode("warm up"))
    for domain in domains_of(table):
        text = prompts_of(table, domain, HELD_OUT)[0]
        ids = runtime.encode(text)
        plain = generate(runtime.loaded.model, ids, GenerationConfig(max_new_tokens=48))
        routed = runtime.generate(ids, max_new_tokens=48)
        answer = routed.text.strip().replace("\n", " ")[:50]
        where = routed.route.domain + (" (fallback)" if routed.route.fallback else "")
        print(f"{domain:<16}{where:<16}{routed.route.distance:>9.4f}{routed.policy['kind']:>14}"
              f"{plain.stats.total_seconds / routed.result.stats.total_seconds:>9.2f}  "
              f"{str(routed.result.token_ids == plain.token_ids):<9}  {answer}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: calibrate_command(args))


if __name__ == "__main__":
    sys.exit(main())
