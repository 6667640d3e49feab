"""Serving benchmark: time to first token, time per output token and throughput at concurrency 1 and 4 on
Spec-Bench prompts, over HTTP (streamed chat completions, greedy), for

  knnssd        `knnssd serve --bundle REF` (the calibrated bundle)
  knnssd-plain  the same server with a copy of the bundle whose policies are all plain decoding
  hf            `transformers serve MODEL` (transformers 5.24: the model is a positional argument; needs
                fastapi, uvicorn, pydantic and openai, i.e. transformers[serving] or knnssd's serve + test extras)
  hf-cb         the same with --continuous-batching

on the same model folder and torch thread count (--threads; OMP_NUM_THREADS for transformers serve). Every server
is started once and stays up; the blocks (repeat x concurrency x server) run one at a time, interleaved in a
rotating order, so drift hits all alike. Per request: TTFT = send to the first chunk with text; TPOT = (last
chunk - first chunk) / (tokens - 1), tokens from the usage the server reports, else the model's tokenizer;
throughput = tokens of a block / its wall time. The TPOT ratio of each server to `hf` comes with a 95% paired
bootstrap interval over prompts (pipeline/bootstrap.py).

    python benchmarks/serve_bench.py --bundle smollm2-135m@latest --prompts 16 --max-tokens 128 --repeats 2 \\
        --threads 2 --out benchmarks/results/serve
    python benchmarks/serve_bench.py --bundle path/to/bundle --smoke       # 2 prompts, 8 tokens, 1 repeat
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_spec_bench, machine_description  # noqa: E402
from knnssd.bundle import BundleSpec, read_bundle, write_bundle, VECTORS_FILE  # noqa: E402
from knnssd.engine.models import builtin_folder, builtin_model  # noqa: E402
from knnssd.bundle.sources import fetch_bundle  # noqa: E402
from pipeline.bootstrap import speedup_interval  # noqa: E402
from tests.services import free_port  # noqa: E402

SYSTEMS = ("knnssd", "knnssd-plain", "hf", "hf-cb")


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    model: str
    process: subprocess.Popen


@dataclass(frozen=True)
class Row:
    system: str
    concurrency: int
    repeat: int
    prompt: int
    category: str
    ttft: float
    tpot: float
    tokens: int
    seconds: float
    text: str


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
        response.raise_for_status()
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
          tokenizer) -> tuple[list[Row], float]:
    def one(index: int) -> Row:
        category, prompt = prompts[index]
        ttft, tpot, tokens, seconds, text = ask(server, prompt, max_tokens, tokenizer)
        return Row(server.name, concurrency, repeat, index, category, ttft, tpot, tokens, seconds, text)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, range(len(prompts))))
    return rows, time.perf_counter() - start


def summarise(rows: list[Row], walls: dict[tuple[str, int], list[float]]) -> list[dict]:
    table = []
    for (system, concurrency), wall in walls.items():
        mine = [r for r in rows if (r.system, r.concurrency) == (system, concurrency)]
        repeats = sorted({r.repeat for r in mine})
        per_repeat = [sum(r.tokens for r in mine if r.repeat == k) / w for k, w in zip(repeats, wall)]
        entry = {"system": system, "concurrency": concurrency, "requests": len(mine),
                 "ttft_median": float(np.median([r.ttft for r in mine])),
                 "tpot_median": float(np.median([r.tpot for r in mine])),
                 "tpot_mean": float(np.mean([r.tpot for r in mine])),
                 "throughput": float(np.mean(per_repeat)), "throughput_min": min(per_repeat),
                 "throughput_max": max(per_repeat)}
        base = [r for r in rows if (r.system, r.concurrency) == ("hf", concurrency)]
        if base and sum(r.tpot for r in base) > 0 and sum(r.tpot for r in mine) > 0:
            prompts = sorted({r.prompt for r in mine})
            mean = lambda rs, p: float(np.mean([r.tpot for r in rs if r.prompt == p]))  # noqa: E731
            interval = speedup_interval([mean(base, p) for p in prompts], [mean(mine, p) for p in prompts])
            entry.update(tpot_gain_vs_hf=interval.estimate, gain_low=interval.low, gain_high=interval.high)
        plain = {(r.repeat, r.prompt): r.text for r in rows if (r.system, r.concurrency) == ("knnssd-plain",
                                                                                           concurrency)}
        if plain:  # greedy: how many answers equal plain decoding's text (knnssd: all of them, being lossless)
            entry["same_text_as_plain"] = f"{sum(r.text == plain[(r.repeat, r.prompt)] for r in mine)}/{len(mine)}"
        table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="the calibrated bundle: registry reference or folder")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--data", default=None, help="Spec-Bench question.jsonl (default: ../shared/data/...)")
    parser.add_argument("--prompts", type=int, default=16, help="Spec-Bench prompts, spread over its categories")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"a subset of {','.join(SYSTEMS)}")
    parser.add_argument("--out", default=None, help="folder for requests.csv and summary.json")
    parser.add_argument("--smoke", action="store_true", help="2 prompts, 8 tokens, 1 repeat: checks the set-up")
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.max_tokens, args.repeats = 2, 8, 1
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"error: unknown systems {sorted(unknown)} (fix: use {','.join(SYSTEMS)})")
    rows_all = load_spec_bench(args.data)
    categories = sorted({r["category"] for r in rows_all})
    prompts = [(c, r["turns"][0]) for i in range(args.prompts) for c in [categories[i % len(categories)]]
               for r in [[x for x in rows_all if x["category"] == c][i // len(categories)]]]

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    folder = fetch_bundle(args.bundle, args.tracking_uri)
    model = model_folder(read_bundle(folder).model_id)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "KNNSSD_THREADS": str(args.threads)}
    bin_dir = Path(sys.executable).parent
    commands = {
        "knnssd": lambda p: [str(bin_dir / "knnssd"), "serve", "--bundle", args.bundle, "--port", str(p),
                             "--threads", str(args.threads), "--refresh-seconds", "0", "--log-level", "warning"]
        + (["--tracking-uri", args.tracking_uri] if args.tracking_uri else []),
        "knnssd-plain": lambda p: [str(bin_dir / "knnssd"), "serve", "--bundle",
                                   str(plain_copy(folder, work / "plain-bundle")), "--port", str(p), "--threads",
                                   str(args.threads), "--log-level", "warning"],
        "hf": lambda p: [str(bin_dir / "transformers"), "serve", model, "--host", "127.0.0.1", "--port", str(p),
                         "--device", "cpu", "--dtype", "float32"],
        "hf-cb": lambda p: [str(bin_dir / "transformers"), "serve", model, "--host", "127.0.0.1", "--port", str(p),
                            "--device", "cpu", "--dtype", "float32", "--continuous-batching"],
    }
    names = {"knnssd": None, "knnssd-plain": "plain-bundle", "hf": model, "hf-cb": model}
    servers = []
    try:
        for system in systems:
            port = free_port()
            served = names[system] or (Path(args.bundle).name if Path(args.bundle).is_dir()
                                       else args.bundle.split("@")[0])
            servers.append(start(system, commands[system](port), env, served, port, work / f"{system}.log"))
            print(f"{system} ready at {servers[-1].url}", flush=True)
        for server in servers:  # one untimed request each: first-call costs off the clock
            ask(server, prompts[0][1], 4, tokenizer)
        rows, walls = [], {}
        levels = [int(c) for c in args.concurrency.split(",")]
        for repeat in range(args.repeats):
            for concurrency in levels:
                order = servers[repeat % len(servers):] + servers[:repeat % len(servers)]
                for server in order:
                    got, wall = block(server, prompts, concurrency, repeat, args.max_tokens, tokenizer)
                    rows += got
                    walls.setdefault((server.name, concurrency), []).append(wall)
                    print(f"repeat {repeat} concurrency {concurrency} {server.name}: {wall:.1f} s", flush=True)
    finally:
        for server in servers:
            server.process.terminate()
            server.process.wait(timeout=30)
    table = summarise(rows, walls)
    print(f"\n{datetime.date.today()}  {machine_description()}  threads {args.threads}  prompts {len(prompts)}  "
          f"max_tokens {args.max_tokens}  repeats {args.repeats}")
    print(f"{'system':14} {'conc':>4} {'TTFT ms':>8} {'TPOT ms':>8} {'tok/s (min-max)':>20} "
          f"{'TPOT gain vs hf (95% CI)':>26} {'same text as plain':>19}")
    for e in table:
        gain = f"{e['tpot_gain_vs_hf']:.2f}x [{e['gain_low']:.2f}, {e['gain_high']:.2f}]" if "gain_low" in e else ""
        spread = f"{e['throughput']:.1f} ({e['throughput_min']:.1f}-{e['throughput_max']:.1f})"
        print(f"{e['system']:14} {e['concurrency']:>4} {e['ttft_median'] * 1e3:8.1f} {e['tpot_median'] * 1e3:8.1f} "
              f"{spread:>20} {gain:>26} {e.get('same_text_as_plain', ''):>19}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "requests.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        (out / "summary.json").write_text(json.dumps({"date": str(datetime.date.today()), "machine":
                                                      machine_description(), "args": vars(args), "table": table},
                                                     indent=2))


if __name__ == "__main__":
    main()
