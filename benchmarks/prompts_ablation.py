"""Issue 29's prompts ablation, hardware-free: does a policy searched on 4 calibration prompts per trial generalise
worse than one searched on 16? Per domain, the pipeline's own search (`pipeline.search`) at each
--settings prompts_per_trial, and each setting's chosen policy replayed exactly on held-out prompts.

    python benchmarks/prompts_ablation.py --model smollm2-135m [--threads 1] [--settings 4,16] [--trials 100]
        [--store-prompts 16] [--held-out 10] [--max-new-tokens 64] [--search-tokens 32] [--store-tokens 128]
        [--costs FILE] [--domains a,b] [--out DIR]

Data, stores and held-out traces as `benchmarks/draft_ablation.py` builds them (Spec-Bench split as calibration
splits it with --merge-mt-bench: 6 domains): each domain's store holds the model's plain greedy outputs of its first
--store-prompts calibration prompts (--store-tokens each, with successor rows), every store carries the union of
all of them (as calibration's store stage sets it), and each domain's first --held-out held-out prompts are
decoded plainly for --max-new-tokens (no held-out prompt is in any store: checked).

For each domain and setting s: an Optuna study as a calibration search worker runs it (`prepare_study`: seeds and
kind quota; `open_worker_study`: calibration's sampler and seed; `make_objective`, `run_worker`), --trials trials,
on the workload a search worker builds (`pipeline.tasks.search_workload`: the first s store prompts, traced from
the store at --search-tokens, each drafting from the store without its own output). Both settings search the
same store; s = 4 scores on the first 4 of the 16 prompts s = 16 scores on. The chosen policy is the study's best
trial (highest predicted speedup; calibration would then confirm its top candidates in wall clock, which this
ablation leaves out). That policy is then replayed (`pipeline.replay`) and priced (`pipeline.costs`) on:

  in-sample       the study's own prompts (leave-one-out), which must reproduce the trial's value (checked)
  held-out        the held-out traces at --max-new-tokens, drafting from the whole store (as the runtime does)
  held-out@S      the same traces cut to --search-tokens (the in-sample length: a fair gap, since the length
                  alone moves a speedup through the prefill's share and the growing context)

Figures (nothing is timed during the ablation: any machine gives the same figures for one model, kernels and
step-cost table):
  speedup       predicted speedup, sum of priced plain seconds / sum of priced drafted seconds over the prompts
                (a domain's, or every domain's prompts each under its own domain's policy: "overall")
  tokens/step   tokens per verify step, (accepted + steps) / steps pooled over the prompts ("mean accepted
                tokens" in Spec-Bench tables and calibration's logs)
  95% CI        a bootstrap over prompts (`pipeline.bootstrap`)
  gap           in-sample minus held-out@S: how much the search's own figure overstates the policy (overfitting)
  difference    held-out figure of each later setting minus the first's (16 - 4), with a 95% paired bootstrap
                interval over held-out prompts (the same prompts and traces under both policies)

Step costs: --costs FILE reads a table (`StepCosts.to_dict` JSON; calibration writes them under
<work-dir>/step-costs/), else the table is timed once here (`pipeline.costs.time_step_costs`, on --threads
threads; written to DIR/step-costs.json with --out, for reuse). The output says which.

--out DIR writes summary.json, per_prompt.csv and prompts_ablation.png (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import chosen_names, machine_description  # noqa: E402
from benchmarks.draft_ablation import (PromptResult, build_stores, build_traces, check_held_out,  # noqa: E402
                                       load_for_replay, pooled, spec_bench_split, tokens_interval)
from knnssd.engine.decoding import model_eos_ids  # noqa: E402
from knnssd.engine.policy import describe_policy  # noqa: E402
from knnssd.engine.prompts import encode_prompt  # noqa: E402
from knnssd.errors import KnnSsdError  # noqa: E402
from pipeline.bootstrap import difference_interval, ratio_difference_interval, speedup_interval  # noqa: E402
from pipeline.costs import StepCosts, time_step_costs  # noqa: E402
from pipeline.data import DataConfig, domains_of  # noqa: E402
from pipeline.drafting import PolicyDrafters  # noqa: E402
from pipeline.replay import Replayed, Step, predict, replay  # noqa: E402
from pipeline.scoring import Workload, policy_skip_set, workload_of  # noqa: E402
from pipeline.search import completed_trials, make_objective, open_worker_study, prepare_study, run_worker  # noqa: E402
from pipeline.space import SearchConfig  # noqa: E402
from pipeline.stores import DomainStore  # noqa: E402
from pipeline.tasks import search_workload  # noqa: E402
from pipeline.traces import Trace, store_trace  # noqa: E402

IN_SAMPLE, HELD_OUT, HELD_OUT_SHORT = "in_sample", "held_out", "held_out_short"
SPLITS = (IN_SAMPLE, HELD_OUT, HELD_OUT_SHORT)
OVERALL = "overall"


@dataclass(frozen=True)
class Priced:
    """One prompt replayed under one setting's chosen policy and priced: `result`'s policy field is the setting
    ("4"), its domain and prompt index (in the split's order) are the prompt's."""

    setting: int
    split: str
    result: PromptResult
    plain_seconds: float
    seconds: float


@dataclass(frozen=True)
class StudyOutcome:
    """A finished study: its best trial's policy and value (predicted speedup on its own prompts), how many
    trials completed and were pruned, its wall time, and the prompts it scored on."""

    setting: int
    domain: str
    policy: dict[str, Any]
    value: float
    trial: int
    completed: int
    pruned: int
    seconds: float
    prompts: int


@dataclass(frozen=True)
class Ablation:
    """Every study and every priced prompt (all settings, domains and splits)."""

    studies: tuple[StudyOutcome, ...]
    rows: tuple[Priced, ...]


def parse_settings(text: str) -> tuple[int, ...]:
    """"4,16" -> (4, 16): at least two distinct positive prompts_per_trial values, in the order given (the first is
    the baseline the others are compared with)."""
    try:
        settings = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise KnnSsdError(f"--settings {text!r} is not a list of integers", fix="pass e.g. --settings 4,16") from None
    if len(settings) < 2 or len(set(settings)) != len(settings) or min(settings) < 1:
        raise KnnSsdError(f"--settings needs at least two distinct positive values, got {text!r}",
                          fix="pass e.g. --settings 4,16")
    return settings


def with_union(stores: dict[str, DomainStore]) -> dict[str, DomainStore]:
    """Each store carrying the union of all of them, in domain order, as calibration's store stage sets it
    (`pipeline.store_stage.build_stores`): store_scope is then searched where there is more than one domain."""
    union = DomainStore.union(list(stores.values()), "union")
    return {domain: replace(store, union_store=union) for domain, store in stores.items()}


def cut_trace(trace: Trace, max_new_tokens: int, eos: Sequence[int]) -> Trace:
    """`trace` as plain decoding with a budget of `max_new_tokens` (<= its own) records it: greedy decoding with a
    smaller budget writes a prefix of the same output (`pipeline.traces.store_trace`)."""
    import torch

    cut = store_trace(torch.tensor([trace.prompt]), trace.tokens, trace.successors, max_new_tokens, eos)
    if cut is None:
        raise KnnSsdError(f"a held-out trace of {len(trace.tokens)} tokens cannot be cut to {max_new_tokens}",
                          fix="use --max-new-tokens >= --search-tokens")
    return cut


def priced_replay(model: Any, num_layers: int, policy: dict[str, Any], workload: Workload, costs: StepCosts,
                  store: DomainStore, drafters: PolicyDrafters, setting: int, domain: str,
                  split: str) -> list[Priced]:
    """`policy` replayed on every prompt of `workload` and priced, prompt by prompt, as `score_policy` does on the
    whole workload (a prompt in `store` drafts from the store without its own output; any other from all of it)."""
    skip_set = policy_skip_set(policy)
    rows = []
    for index, (trace, cache) in enumerate(zip(workload.traces, workload.caches)):
        drafter = drafters.drafter(policy, store, workload.text(index))
        plain = costs.plain_seconds(trace)
        if drafter is None:  # plain decoding: one step per new token but the prefill's
            replayed = Replayed(steps=tuple(Step(0, 0, 0) for _ in range(len(trace.tokens) - 1)))
            seconds = plain
        else:
            prediction = predict(model, trace, cache, skip_set) if skip_set is not None else None
            replayed = replay(drafter, trace, prediction)
            seconds = costs.generation_seconds(trace, replayed, skip_set)
        rows.append(Priced(setting=setting, split=split, result=PromptResult.of(str(setting), domain, index, replayed),
                           plain_seconds=plain, seconds=seconds))
    return rows


def speedup_of(rows: Sequence[Priced]) -> float:
    """sum of plain seconds / sum of seconds over `rows` (score_policy's pooled figure)."""
    seconds = sum(r.seconds for r in rows)
    return sum(r.plain_seconds for r in rows) / seconds if seconds else 1.0


def search_domain(model: Any, num_layers: int, encode: Callable[[str], Any], domain: str, store: DomainStore,
                  config: SearchConfig, costs: StepCosts, storage_dir: Path, log: Callable[[str], None],
                  verbose: bool = False) -> tuple[StudyOutcome, Workload]:
    """One calibration search of `domain` at `config.prompts_per_trial` (the driver's `prepare_study`, then one
    worker's study, objective and run), in a fresh journal under `storage_dir`. Returns its outcome and the
    workload its trials scored on."""
    started = time.perf_counter()
    quiet = (lambda message: None)
    speak = (lambda message: log(f"[{domain} x{config.prompts_per_trial}] {message}")) if verbose else quiet
    workload = search_workload(model, encode, list(store.prompts), config, store, speak)
    if list(workload.texts) != list(store.prompts[:config.prompts_per_trial]):  # every setting: a prefix of one store
        raise RuntimeError(f"{domain}: the search did not score on the store's first {config.prompts_per_trial} "
                           "prompts")
    storage = str(storage_dir / f"{domain}-{config.prompts_per_trial}.journal")
    name = f"prompts-ablation-{domain}-{config.prompts_per_trial}"
    prepare_study(storage, name, num_layers, config, has_store=True)
    study = open_worker_study(storage, name, config, worker=0)
    run_worker(study, make_objective(model, num_layers, workload, costs, config, speak, store), config)
    done = completed_trials(study)
    if not done:
        raise KnnSsdError(f"the {domain} study at {config.prompts_per_trial} prompts completed no trial",
                          fix="raise --trials, or check the skip-ratio bounds")
    best = max(done, key=lambda t: (t.value, -t.number))  # the first of equal values, as study.best_trial
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.get_trials(deepcopy=False))
    return StudyOutcome(setting=config.prompts_per_trial, domain=domain, policy=best.user_attrs["policy"],
                        value=float(best.value), trial=best.number, completed=len(done), pruned=pruned,
                        seconds=time.perf_counter() - started, prompts=len(workload.traces)), workload


def ablate(model: Any, num_layers: int, encode: Callable[[str], Any], stores: dict[str, DomainStore],
           held_out: dict[str, list[tuple[str, Any, Trace]]], costs: StepCosts, settings: Sequence[int],
           trials: int, search_tokens: int, seed: int = 0, log: Callable[[str], None] = print,
           verbose: bool = False) -> Ablation:
    """Every domain of `stores` searched at every setting, each chosen policy priced in-sample, held out (the
    `held_out` traces of `build_traces`: domain -> (text, ids, trace)) and held out cut to `search_tokens`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for domain, store in stores.items():
        if max(settings) > len(store.prompts):
            raise KnnSsdError(f"setting {max(settings)} prompts per trial, but the {domain} store holds "
                              f"{len(store.prompts)} prompts (the search would score on {len(store.prompts)})",
                              fix="raise --store-prompts or lower --settings")
    eos = model_eos_ids(model)
    studies, rows = [], []
    with tempfile.TemporaryDirectory(prefix="prompts-ablation-") as folder:
        for domain, store in stores.items():
            texts = [text for text, _, _ in held_out[domain]]
            long = workload_of(model, [trace for _, _, trace in held_out[domain]], texts)
            short = workload_of(model, [cut_trace(trace, search_tokens, eos) for _, _, trace in held_out[domain]],
                                texts)
            for setting in settings:
                config = SearchConfig(trials=trials, prompts_per_trial=setting, max_new_tokens=search_tokens,
                                      seed=seed)
                outcome, workload = search_domain(model, num_layers, encode, domain, store, config, costs,
                                                  Path(folder), log, verbose)
                drafters = PolicyDrafters(num_layers)
                priced = {split: priced_replay(model, num_layers, outcome.policy, work, costs, store, drafters,
                                               setting, domain, split)
                          for split, work in ((IN_SAMPLE, workload), (HELD_OUT, long), (HELD_OUT_SHORT, short))}
                in_sample = speedup_of(priced[IN_SAMPLE])
                if not math.isclose(in_sample, outcome.value, rel_tol=1e-9):
                    raise RuntimeError(f"{domain} x{setting}: the chosen policy replays in-sample to {in_sample!r}, "
                                       f"its trial scored {outcome.value!r}: replay is not deterministic here")
                studies.append(outcome)
                rows.extend(row for split in SPLITS for row in priced[split])
                tally = pooled([r.result for r in priced[IN_SAMPLE]])["tokens_per_step"]
                log(f"study {domain} x{setting}: {outcome.completed} trials ({outcome.pruned} pruned) on "
                    f"{outcome.prompts} prompts in {outcome.seconds:.0f} s; best #{outcome.trial} "
                    f"{outcome.value:.3f}x, {tally:.2f} tokens/step in-sample; held out "
                    f"{speedup_of(priced[HELD_OUT]):.3f}x, "
                    f"{pooled([r.result for r in priced[HELD_OUT]])['tokens_per_step']:.2f} tokens/step: "
                    f"{describe_policy(outcome.policy)}")
    return Ablation(studies=tuple(studies), rows=tuple(rows))


def figures(rows: Sequence[Priced], seed: int) -> dict[str, Any]:
    """Pooled speedup and tokens per step over `rows`, each with its 95% bootstrap interval over prompts."""
    results = [r.result for r in rows]
    speedup = speedup_interval([r.plain_seconds for r in rows], [r.seconds for r in rows], seed=seed)
    tokens = tokens_interval(results, seed)
    return {"speedup": speedup.estimate, "speedup_ci95": [speedup.low, speedup.high],
            "tokens_per_step": tokens.estimate, "tokens_per_step_ci95": [tokens.low, tokens.high],
            "mean_width": pooled(results)["mean_width"], "prompts": len(rows)}


def paired(rows: Sequence[Priced], setting: int, domain: str | None) -> list[Priced]:
    """The held-out rows of `setting` (of `domain`; None: every domain), in (domain, prompt) order."""
    kept = [r for r in rows if r.setting == setting and r.split == HELD_OUT
            and (domain is None or r.result.domain == domain)]
    return sorted(kept, key=lambda r: (r.result.domain, r.result.prompt))


def difference(rows: Sequence[Priced], base: int, other: int, domain: str | None, seed: int) -> dict[str, Any]:
    """Held-out speedup and tokens per step of `other`'s policy minus `base`'s, paired over the same prompts."""
    a, b = paired(rows, base, domain), paired(rows, other, domain)
    keys = [(r.result.domain, r.result.prompt) for r in a]
    if keys != [(r.result.domain, r.result.prompt) for r in b] or not keys:
        raise RuntimeError("the settings were not replayed on the same held-out prompts")
    if any(x.plain_seconds != y.plain_seconds for x, y in zip(a, b)):
        raise RuntimeError("one held-out prompt priced differently under two settings")
    speed = difference_interval([r.plain_seconds for r in b], [r.seconds for r in b], [[r.seconds for r in a]],
                                seed=seed)
    # committed tokens may differ by policy where plain decoding stopped at an EOS (`pipeline.replay`)
    tokens = ratio_difference_interval([r.result.tokens for r in b], [r.result.steps for r in b],
                                       [r.result.tokens for r in a], [r.result.steps for r in a], seed=seed)
    return {"speedup": speed.estimate, "speedup_ci95": [speed.low, speed.high],
            "tokens_per_step": tokens.estimate, "tokens_per_step_ci95": [tokens.low, tokens.high],
            "prompts": len(keys)}


def gap(in_sample: dict[str, Any], held: dict[str, Any]) -> dict[str, float]:
    return {"speedup": in_sample["speedup"] - held["speedup"],
            "tokens_per_step": in_sample["tokens_per_step"] - held["tokens_per_step"]}


def setting_summary(rows: Sequence[Priced], setting: int, domain: str | None, seed: int) -> dict[str, Any]:
    """One setting's figures on one domain (None: overall) per split, and its gaps."""
    split_figures = {split: figures([r for r in rows if r.setting == setting and r.split == split
                                     and (domain is None or r.result.domain == domain)], seed)
                     for split in SPLITS}
    return {**split_figures, "gap": gap(split_figures[IN_SAMPLE], split_figures[HELD_OUT_SHORT]),
            "gap_at_max_new_tokens": gap(split_figures[IN_SAMPLE], split_figures[HELD_OUT])}


def summarise(ablation: Ablation, domains: Sequence[str], settings: Sequence[int], seed: int) -> dict[str, Any]:
    """What summary.json holds besides its header: per setting, domain and "overall", figures and the chosen
    policy; per later setting, its held-out difference from the first."""
    rows = ablation.rows
    result: dict[str, Any] = {"settings": {}, "differences": {}}
    for setting in settings:
        per = {}
        for domain in domains:
            study = next(s for s in ablation.studies if s.setting == setting and s.domain == domain)
            per[domain] = {"policy": study.policy, "describe": describe_policy(study.policy),
                           "best_trial": study.trial, "best_value": study.value, "completed_trials": study.completed,
                           "pruned_trials": study.pruned, "search_seconds": study.seconds,
                           "prompts_scored": study.prompts, **setting_summary(rows, setting, domain, seed)}
        per[OVERALL] = setting_summary(rows, setting, None, seed)
        result["settings"][str(setting)] = per
    base = settings[0]
    for other in settings[1:]:
        result["differences"][f"{other}-{base}"] = {
            **{domain: difference(rows, base, other, domain, seed) for domain in domains},
            OVERALL: difference(rows, base, other, None, seed)}
    return result


def _ci(pair: Sequence[float], form: str = ".3f") -> str:
    return f"[{pair[0]:{form}}, {pair[1]:{form}}]"


def print_table(summary: dict[str, Any], domains: Sequence[str], search_tokens: int, costs_source: str) -> None:
    names = [*domains, OVERALL]
    width = max(len(n) for n in names)
    print(f"\npredicted speedup and tokens per verify step of each setting's chosen policy (95% CI over prompts);"
          f" step costs: {costs_source}")
    print(f"{'domain':<{width}} {'setting':>7} {'in-sample':>9} {'tok/st':>6}  {'held-out':>24} "
          f"{'tok/step':>22}  {f'held@{search_tokens}':>9} {'gap':>7} {'gap tok':>7}")
    for name in names:
        for setting, per in summary["settings"].items():
            row = per[name]
            ins, held, short = row[IN_SAMPLE], row[HELD_OUT], row[HELD_OUT_SHORT]
            print(f"{name:<{width}} {setting:>7} {ins['speedup']:>9.3f} {ins['tokens_per_step']:>6.2f}  "
                  f"{held['speedup']:>6.3f} {_ci(held['speedup_ci95']):>17} "
                  f"{held['tokens_per_step']:>5.2f} {_ci(held['tokens_per_step_ci95'], '.2f'):>16}  "
                  f"{short['speedup']:>9.3f} {row['gap']['speedup']:>+7.3f} {row['gap']['tokens_per_step']:>+7.2f}")
    for label, per in summary["differences"].items():
        print(f"\nheld-out difference {label} (paired bootstrap over held-out prompts)")
        print(f"{'domain':<{width}} {'speedup':>26} {'tokens/step':>26} {'prompts':>7}")
        for name in names:
            d = per[name]
            print(f"{name:<{width}} {d['speedup']:>+8.3f} {_ci(d['speedup_ci95'], '+.3f'):>17} "
                  f"{d['tokens_per_step']:>+8.3f} {_ci(d['tokens_per_step_ci95'], '+.3f'):>17} {d['prompts']:>7}")
    print("\nchosen policies")
    for setting, per in summary["settings"].items():
        for name in domains:
            print(f"  {name} x{setting}: {per[name]['describe']}")


def write_outputs(out: Path, summary: dict[str, Any], rows: Sequence[Priced]) -> None:
    """summary.json, per_prompt.csv and, with matplotlib, prompts_ablation.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_rows(out, rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no chart", flush=True)
        return
    chart(plt, out / "prompts_ablation.png", summary)


def write_rows(out: Path, rows: Sequence[Priced]) -> None:
    """per_prompt.csv under `out`: written before the summary too, so a failing summary loses no replay."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "per_prompt.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["setting", "domain", "split", "prompt", "tokens", "steps", "tokens_per_step",
                         "mean_width", "plain_seconds", "seconds", "speedup"])
        for r in rows:
            p = r.result
            writer.writerow([r.setting, p.domain, r.split, p.prompt, p.tokens, p.steps,
                             f"{p.tokens / p.steps:.4f}" if p.steps else "",
                             f"{p.width_sum / p.steps:.4f}" if p.steps else "", f"{r.plain_seconds:.6f}",
                             f"{r.seconds:.6f}", f"{r.plain_seconds / r.seconds:.4f}" if r.seconds else ""])


def chart(plt: Any, path: Path, summary: dict[str, Any]) -> None:
    """Held-out speedup and tokens per step per domain and overall, a bar per setting with its interval, the
    in-sample figure as a marker above or below it."""
    settings = list(summary["settings"])
    names = [*summary["domains"], OVERALL]
    figure, panels = plt.subplots(1, 2, figsize=(13, 4.5))
    step = 0.8 / len(settings)
    for axes, key, label in ((panels[0], "speedup", "predicted speedup"),
                             (panels[1], "tokens_per_step", "tokens per verify step")):
        for i, setting in enumerate(settings):
            rows = [summary["settings"][setting][n] for n in names]
            values = [r[HELD_OUT][key] for r in rows]
            errors = [[v - r[HELD_OUT][f"{key}_ci95"][0] for v, r in zip(values, rows)],
                      [r[HELD_OUT][f"{key}_ci95"][1] - v for v, r in zip(values, rows)]]
            xs = [x + (i - (len(settings) - 1) / 2) * step for x in range(len(names))]
            axes.bar(xs, values, step, yerr=errors, capsize=3, label=f"{setting} prompts/trial, held out")
            axes.scatter(xs, [r[IN_SAMPLE][key] for r in rows], marker="D", s=30, color="crimson", zorder=3,
                         label="in-sample (the search's own prompts)" if i == 0 else None)
        axes.set_xticks(range(len(names)), names, rotation=20, ha="right")
        axes.set_ylabel(f"{label} (95% CI)")
        axes.axhline(1.0, color="grey", linewidth=0.8)
        axes.legend(fontsize=8)
    figure.suptitle(f"prompts per trial: {Path(summary['model']).name}, {summary['held_out_per_domain']} held-out "
                    f"prompts per domain at {summary['max_new_tokens']} tokens, {summary['trials']} trials; "
                    f"costs {summary['costs']['source']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def load_costs(path: str | None, model: Any) -> tuple[StepCosts, str]:
    """The step-cost table of --costs, else timed now on `model`; and a few words saying which."""
    if path is None:
        started = time.perf_counter()
        costs = time_step_costs(model)
        return costs, f"timed here in {time.perf_counter() - started:.0f} s on {costs.threads} threads"
    try:
        return StepCosts.from_dict(json.loads(Path(path).read_text())), f"read from {path}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KnnSsdError(f"--costs {path}: not a readable step-cost table ({error})",
                          fix="pass a JSON written by StepCosts.to_dict (calibration's <work-dir>/step-costs/*.json)"
                          ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a model name or a folder written by save_pretrained.")
    p.add_argument("--data", default=None, help="Spec-Bench question.jsonl (default: $KNNSSD_SPEC_BENCH, else "
                                               "../shared/data/spec_bench/question.jsonl beside the repo).")
    p.add_argument("--domains", default=None, help="comma-separated domains to run (default: all 6).")
    p.add_argument("--seed", type=int, default=0, help="the data split's seed and the searches' (calibration's: 0).")
    p.add_argument("--held-out-fraction", type=float, default=DataConfig.held_out_fraction,
                   help="as calibration's flag (the split must be calibration's).")
    p.add_argument("--settings", default="4,16", help="prompts_per_trial values compared, the first the baseline.")
    p.add_argument("--trials", type=int, default=SearchConfig.trials, help="trials per study (calibration's: 100).")
    p.add_argument("--store-prompts", type=int, default=16, help="calibration prompts per domain in its store.")
    p.add_argument("--held-out", type=int, default=10, help="held-out prompts per domain measured.")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens of the held-out traces.")
    p.add_argument("--search-tokens", type=int, default=SearchConfig.max_new_tokens,
                   help="new tokens of the search's traces (calibration's --max-new-tokens: 32).")
    p.add_argument("--store-tokens", type=int, default=128, help="new tokens per store output.")
    p.add_argument("--store-batch", type=int, default=8, help="prompts decoded together for stores and traces.")
    p.add_argument("--costs", default=None, metavar="FILE", help="a step-cost table (StepCosts.to_dict JSON); "
                                                                 "default: timed once here.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's).")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template to prompts.")
    p.add_argument("--verbose", action="store_true", help="the searches' trial lines too.")
    p.add_argument("--out", default=None, metavar="DIR", help="write summary.json, per_prompt.csv, a PNG chart.")
    return p


def check_args(args: argparse.Namespace) -> tuple[int, ...]:
    """Refuse bad flags before any work; returns the settings."""
    for flag in ("trials", "store_prompts", "held_out", "max_new_tokens", "search_tokens", "store_tokens",
                 "store_batch"):
        if getattr(args, flag) < 1:
            raise KnnSsdError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}",
                              fix="pass a positive number")
    if args.search_tokens > args.max_new_tokens or args.search_tokens > args.store_tokens:
        raise KnnSsdError(f"--search-tokens {args.search_tokens} must be at most --max-new-tokens and "
                          "--store-tokens (search traces come from the store; held-out@S from the held-out traces)",
                          fix="use e.g. --search-tokens 32 --max-new-tokens 64 --store-tokens 128")
    settings = parse_settings(args.settings)
    if max(settings) > args.store_prompts:
        raise KnnSsdError(f"--settings {args.settings}: {max(settings)} prompts per trial, more than "
                          f"--store-prompts {args.store_prompts}", fix="raise --store-prompts or lower --settings")
    return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the ablation; returns what summary.json holds."""
    args = build_parser().parse_args(argv)
    settings = check_args(args)
    table = spec_bench_split(args.data, args.held_out_fraction, args.seed)
    domains = chosen_names("--domains", args.domains, domains_of(table))
    loaded, invariant = load_for_replay(args.model, args.threads)
    model = loaded.model
    print(f"model {args.model}, {len(domains)} domains ({', '.join(domains)}), settings {settings}, "
          f"{args.trials} trials per study", flush=True)
    started = time.perf_counter()
    costs, source = load_costs(args.costs, model)
    if args.out and args.costs is None:  # kept at once, for a rerun's --costs
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "step-costs.json").write_text(json.dumps(costs.to_dict(), indent=2))
    print(f"step costs {source}: plain step {costs.verify[0][0] * 1e3:.2f} ms at {costs.contexts[0]} tokens, "
          + ", ".join(f"{k} {v:.2f}" for k, v in costs.relative().items() if k != "v1"), flush=True)

    def encode(text: str):
        return encode_prompt(loaded.tokenizer, text, chat=not args.no_chat)

    stores = with_union(build_stores(model, encode, table, domains, args.store_prompts, args.store_tokens,
                                     args.store_batch, invariant))
    traces = build_traces(model, encode, table, domains, args.held_out, args.max_new_tokens, args.store_batch,
                          invariant)
    check_held_out(stores, traces)
    ablation = ablate(model, loaded.num_layers, encode, stores, traces, costs, settings, args.trials,
                      args.search_tokens, seed=args.seed)
    if args.out:
        write_rows(Path(args.out), ablation.rows)
    summary = {"model": args.model, "machine": machine_description(), "domains": domains,
               "settings_compared": list(settings), "trials": args.trials, "seed": args.seed,
               "store_prompts_per_domain": args.store_prompts, "store_tokens": args.store_tokens,
               "held_out_per_domain": args.held_out, "max_new_tokens": args.max_new_tokens,
               "search_tokens": args.search_tokens, "batch_invariant": invariant,
               "costs": {"source": source, "table": costs.to_dict()},
               **summarise(ablation, domains, settings, args.seed), "seconds": time.perf_counter() - started}
    print_table(summary, domains, args.search_tokens, source)
    if args.out:
        write_outputs(Path(args.out), summary, ablation.rows)
        print(f"wrote {args.out}/summary.json, per_prompt.csv", flush=True)
    return summary


if __name__ == "__main__":
    try:
        main()
    except KnnSsdError as error:
        raise SystemExit(f"error: {error}") from None
