"""Serving benchmark: throughput, time to first token and time per output token at concurrency 1, 4, 8 and 16 on
Spec-Bench prompts, over HTTP (streamed chat completions, greedy), for

  knnssd        `knnssd serve --bundle REF` (the calibrated bundle)
  knnssd-plain  the same server with a copy of the bundle whose policies are all plain decoding
  hf            `transformers serve MODEL` (transformers 5.24: the model is a positional argument; needs
                fastapi, uvicorn, pydantic and openai, i.e. transformers[serving] or knnssd's serve + test extras)
  hf-cb         the same with --continuous-batching

on the same model folder and torch thread count (--threads; OMP_NUM_THREADS for transformers serve). Every server
is started once and stays up; the blocks (repeat x concurrency x server; a block = every prompt once, `concurrency`
at a time) run one at a time, interleaved in a rotating order, so drift hits all alike. For the knnssd servers the
step histograms of /metrics are read before and after each block (batch size per verify step, drafted and accepted
tokens per request-step; "n/a" where the server does not export them), and every greedy answer is checked against
knnssd-plain's answer to the same prompt alone. Definitions: benchmarks/serve_report.py. At the end: the goals,
each with a verdict (knnssd throughput >= 1.5x hf-cb at concurrency 4 and 8; 0 mismatches; knnssd TPOT at
concurrency 1). --max-batch is passed to `knnssd serve` only where its --help lists that flag.

    python benchmarks/serve_bench.py --bundle smollm2-135m@latest --prompts 16 --max-tokens 128 --repeats 2 \\
        --concurrency 1,4,8,16 --threads 2 --out benchmarks/results/serve-DATE
    python benchmarks/serve_bench.py --smoke      # a tiny random bundle (its own prompts), 2 prompts, 8 tokens,
                                                  # concurrency 1,2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_spec_bench, machine_description  # noqa: E402
from benchmarks.serve_report import Block, Row, goals, markdown, summarise, write  # noqa: E402
from benchmarks.serve_scrape import Totals, read_totals  # noqa: E402
from knnssd.bundle import BundleSpec, read_bundle, write_bundle, VECTORS_FILE  # noqa: E402
from knnssd.engine.models import builtin_folder, builtin_model  # noqa: E402
from knnssd.bundle.sources import fetch_bundle  # noqa: E402
from tests.services import free_port  # noqa: E402

SYSTEMS = ("knnssd", "knnssd-plain", "hf", "hf-cb")
CONCURRENCY = "1,4,8,16"
SMOKE = dict(prompts=2, max_tokens=8, repeats=1, concurrency="1,2")


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    model: str
    process: subprocess.Popen

    @property
    def knnssd(self) -> bool:
        return self.name.startswith("knnssd")


def plain_copy(folder: Path, target: Path) -> Path:
    """The bundle at `folder` with every policy (and the fallback) replaced by plain decoding."""
    bundle = read_bundle(folder)
    manifest = bundle.manifest
    spec = BundleSpec(model_id=manifest["model_id"], model_hash=manifest["model_hash"], domains=bundle.domains,
                      anchors=np.load(folder / VECTORS_FILE, allow_pickle=False), anchor_domains=bundle.anchor_domains,
                      policies={d: {"kind": "none"} for d in bundle.domains}, fallback_policy={"kind": "none"},
                      fallback_distance=bundle.fallback_distance, prompt_format=manifest.get("prompt_format", {}),
                      calibration={"plain_copy_of": str(folder)})
    return write_bundle(spec, target)


def model_folder(model_id: str) -> str:
    spec = builtin_model(model_id)
    return str(builtin_folder(spec)) if spec else model_id


def server_flags(knnssd: Path) -> str:
    """`knnssd serve --help`, to see which flags this version has."""
    done = subprocess.run([str(knnssd), "serve", "--help"], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"error: `{knnssd} serve --help` failed: {done.stderr.strip()[-500:]} "
                         "(fix: install knnssd with its serve extra into this venv)")
    return done.stdout


def start(name: str, command: list[str], env: dict[str, str], model: str, port: int, log: Path) -> Server:
    process = subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"error: {name} exited with {process.returncode} (fix: see {log})")
        try:
            if httpx.get(url + ("/ready" if name.startswith("knnssd") else "/health"), timeout=2).status_code == 200:
                return Server(name, url, model, process)
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"error: {name} not ready after 300 s (fix: see {log})")
        time.sleep(0.5)


def ask(server: Server, prompt: str, max_tokens: int, tokenizer) -> tuple[float, float, int, float, str]:
    """One streamed greedy chat completion: (ttft, tpot, tokens, seconds, text)."""
    body = {"model": server.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, last, pieces, usage = time.perf_counter(), None, None, [], None
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            response.read()
            raise SystemExit(f"error: {server.name} answered {response.status_code}: {response.text[:300]} "
                             "(fix: a 429 means its queue is full: raise --max-queue; else see its log)")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter()
                    first, last = first or now, now
                    pieces.append(text)
    end = time.perf_counter()
    text = "".join(pieces)
    tokens = (usage or {}).get("completion_tokens") or len(tokenizer(text, add_special_tokens=False)["input_ids"])
    first, last = first or end, last or end
    return first - start, (last - first) / max(tokens - 1, 1), tokens, end - start, text


def block(server: Server, prompts: list[tuple[str, str]], concurrency: int, repeat: int, max_tokens: int,
          tokenizer) -> tuple[list[Row], Block]:
    """Every prompt once, `concurrency` at a time; for a knnssd server, its step histograms over the block."""
    def one(index: int) -> Row:
        category, prompt = prompts[index]
        ttft, tpot, tokens, seconds, text = ask(server, prompt, max_tokens, tokenizer)
        return Row(server.name, concurrency, repeat, index, category, ttft, tpot, tokens, seconds, text)

    before = read_totals(server.url) if server.knnssd else Totals({})
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, range(len(prompts))))
    wall = time.perf_counter() - start
    steps = read_totals(server.url).minus(before).values if server.knnssd else {}
    return rows, Block(server.name, concurrency, repeat, wall, sum(r.tokens for r in rows), steps)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="the calibrated bundle: registry reference or folder "
                        "(optional with --smoke: a tiny random one is built, benchmarks/serve_tiny.py)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--data", default=None, help="Spec-Bench question.jsonl (default: ../shared/data/...)")
    parser.add_argument("--prompts", type=int, default=16, help="Spec-Bench prompts, spread over its categories")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default=CONCURRENCY, help=f"levels, comma-separated (default {CONCURRENCY})")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-batch", type=int, default=None, help="knnssd serve --max-batch N, passed only where "
                        "the server has that flag (default: the server's own default)")
    parser.add_argument("--tpot-baseline-ms", type=float, default=None, help="an earlier run's knnssd TPOT p50 at "
                        "concurrency 1: turns that goal's 'compare by hand' into met / not met")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"a subset of {','.join(SYSTEMS)}")
    parser.add_argument("--out", default=None, help="folder for requests.csv, blocks.csv, summary.csv, summary.md "
                        "and summary.json (default: benchmarks/results/serve-DATE; with --smoke a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="2 prompts, 8 tokens, 1 repeat, concurrency 1,2: "
                        "checks the set-up")
    args = parser.parse_args()
    if args.smoke:
        args = argparse.Namespace(**{**vars(args), **SMOKE})
    elif args.bundle is None:
        parser.error("--bundle is required (only --smoke builds a tiny one)")
    unknown = set(s for s in args.systems.split(",") if s) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"error: unknown systems {sorted(unknown)} (fix: use a subset of {','.join(SYSTEMS)})")
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise SystemExit(f"error: --concurrency {args.concurrency!r} is not a list of positive integers "
                         f"(fix: e.g. --concurrency {CONCURRENCY})")
    if args.prompts < 1 or args.max_tokens < 1 or args.repeats < 1:
        raise SystemExit("error: --prompts, --max-tokens and --repeats must be at least 1 (fix: pass positive numbers)")
    return args


def main() -> None:
    args = parse_args()
    systems = [s for s in args.systems.split(",") if s]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    rows_all = load_spec_bench(args.data)
    categories = sorted({r["category"] for r in rows_all})
    prompts = [(c, r["turns"][0]) for i in range(args.prompts) for c in [categories[i % len(categories)]]
               for r in [[x for x in rows_all if x["category"] == c][i // len(categories)]]]

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if args.bundle is None:  # --smoke without a bundle: the tiny one, asked in its own vocabulary
        from benchmarks.serve_tiny import tiny_prompts, write_tiny_bundle

        args.bundle, prompts = str(write_tiny_bundle(work / "tiny")), tiny_prompts(args.prompts)
    folder = fetch_bundle(args.bundle, args.tracking_uri)
    model = model_folder(read_bundle(folder).model_id)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "KNNSSD_THREADS": str(args.threads)}
    bin_dir = Path(sys.executable).parent
    knnssd_extra = ["--max-queue", str(max(levels))] if max(levels) > 16 else []  # 16: the server's default
    batching = "server default" if "--max-batch" in server_flags(bin_dir / "knnssd") else "not in this server"
    if args.max_batch is not None and batching == "server default":
        knnssd_extra += ["--max-batch", str(args.max_batch)]
        batching = str(args.max_batch)
    elif args.max_batch is not None:
        print(f"warning: this `knnssd serve` has no --max-batch; --max-batch {args.max_batch} is not passed",
              flush=True)
    knnssd_serve = [str(bin_dir / "knnssd"), "serve", "--threads", str(args.threads), "--log-level", "warning",
                    *knnssd_extra]
    hf_serve = [str(bin_dir / "transformers"), "serve", model, "--host", "127.0.0.1", "--device", "cpu",
                "--dtype", "float32"]
    commands = {
        "knnssd": lambda p: knnssd_serve + ["--bundle", args.bundle, "--port", str(p), "--refresh-seconds", "0"]
        + (["--tracking-uri", args.tracking_uri] if args.tracking_uri else []),
        "knnssd-plain": lambda p: knnssd_serve + ["--bundle", str(plain_copy(folder, work / "plain-bundle")),
                                                  "--port", str(p)],
        "hf": lambda p: hf_serve + ["--port", str(p)],
        "hf-cb": lambda p: hf_serve + ["--port", str(p), "--continuous-batching"],
    }
    names = {"knnssd": None, "knnssd-plain": "plain-bundle", "hf": model, "hf-cb": model}
    servers, rows, blocks = [], [], []
    try:
        for system in systems:
            port = free_port()
            served = names[system] or (Path(args.bundle).name if Path(args.bundle).is_dir()
                                       else args.bundle.split("@")[0])
            servers.append(start(system, commands[system](port), env, served, port, work / f"{system}.log"))
            print(f"{system} ready at {servers[-1].url} (log {work / system}.log)", flush=True)
        for server in servers:  # one untimed request each: first-call costs off the clock
            ask(server, prompts[0][1], 4, tokenizer)
        for repeat in range(args.repeats):
            for concurrency in levels:
                order = servers[repeat % len(servers):] + servers[:repeat % len(servers)]
                for server in order:
                    got, done = block(server, prompts, concurrency, repeat, args.max_tokens, tokenizer)
                    rows += got
                    blocks.append(done)
                    print(f"repeat {repeat} concurrency {concurrency} {server.name}: {done.seconds:.1f} s "
                          f"{done.throughput:.1f} tok/s", flush=True)
    finally:
        for server in servers:
            server.process.terminate()
            server.process.wait(timeout=30)
    for system in systems:
        if not any(r.text for r in rows if r.system == system):
            print(f"warning: every answer of {system} is empty text, so TTFT and TPOT time nothing and the answer "
                  "check compares nothing (see its log; a model that reads the prompts as unknown tokens does this)")
    table = summarise(rows, blocks)
    goal_rows = goals(table, args.tpot_baseline_ms)
    header = (f"{datetime.date.today()}  {machine_description()}\nbundle {args.bundle}  threads {args.threads}  "
              f"prompts {len(prompts)}  max_tokens {args.max_tokens}  repeats {args.repeats}  concurrency "
              f"{','.join(map(str, levels))}  knnssd --max-batch: {batching}")
    print(f"\n{header}\n\n{markdown(table, goal_rows)}")
    out = Path(args.out) if args.out else (work / "results" if args.smoke else
                                           Path(__file__).parent / "results" / f"serve-{datetime.date.today()}")
    write(out, header, rows, blocks, table, goal_rows, vars(args))
    print(f"\nwritten: {out}/summary.md, summary.csv, blocks.csv, requests.csv, summary.json")


if __name__ == "__main__":
    main()
