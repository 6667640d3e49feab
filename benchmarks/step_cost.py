"""What one decoding step costs, per width, beside the memory-bound floor: the verify tax, measured.

    python benchmarks/step_cost.py [--model smollm2-135m] [--contexts 200,1500] [--widths 1-16,24,32] [--repeats 15]
                                   [--out FILE.json]

For each context, widths 1-16, 24 and 32 are timed as a real decode runs them: every verify pass of width w follows a
1-token step (shapes switch as they do in decoding), the widths in a shuffled order each round, the cache cropped
back after each pass so the context stays put. Both engines in the same run, interleaved round by round:
"fast" (the linear-layer methods `knnssd.engine.kernels` chose at load) and "transformers" (F.linear everywhere).

    plain step   median ms of the 1-token steps;   v(w) = median ms of width-w passes / plain step
    v*(w)        the fast engine's width-w median over the faster of the two engines' plain steps, so that a
                 slower plain step can never be what makes v small

The floor: a step must read every weight once (and the KV cache), so bytes read / stream bandwidth, the
bandwidth measured here by summing a 256 MB tensor on 4 KB pages and on huge pages (where the engine puts the
weights), before and after each context's timings, the fastest of them all taken; "of the floor's speed" is
floor / plain step. A per-op profile (torch.profiler) of widths 1, 4 and 8 shows
where the rest goes. Last, plain decoding of 64 tokens: transformers' `generate` beside ours, both engines.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_description  # noqa: E402
from knnssd.engine.decoding import GenerationConfig, generate, warm_up  # noqa: E402
from knnssd.engine.kernels import transformers_kernels  # noqa: E402
from knnssd.engine.kvcache import new_cache, rollback  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402
from knnssd.engine.weights import arena  # noqa: E402

WIDTHS = (*range(1, 17), 24, 32)


def parse_widths(text: str) -> tuple[int, ...]:
    """'1-16,32' -> (1, 2, ..., 16, 32); width 1 (the plain step) is always included."""
    widths = {1}
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        widths.update(range(int(low), int(high or low) + 1))
    return tuple(sorted(widths))


def stream_bandwidth_gbs(megabytes: int = 256, repeats: int = 7, huge_pages: bool = False) -> float:
    """GB/s of summing a `megabytes` float32 tensor (a read stream, as a memory-bound step is); with `huge_pages`,
    the tensor lies where the engine puts weights (`knnssd.engine.weights.arena`: huge pages where the OS allows)."""
    elements = megabytes * 1024 * 1024 // 4
    data = arena(elements * 4)[0].view(torch.float32) if huge_pages else torch.empty(elements)
    data.fill_(1.0)
    data.sum()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        samples.append(time.perf_counter() - start)
    return data.numel() * 4 / sorted(samples)[repeats // 2] / 1e9


STREAM_KINDS = (("4 KB pages", False), ("huge pages", True))  # (label, huge_pages) of each stream measured


def measure_streams(streams: dict[str, list[float]]) -> None:
    """Append one `stream_bandwidth_gbs` of each of STREAM_KINDS to `streams` (label -> GB/s so far)."""
    for kind, huge in STREAM_KINDS:
        streams.setdefault(kind, []).append(stream_bandwidth_gbs(huge_pages=huge))


def streams_text(streams: dict[str, list[float]]) -> str:
    """e.g. '4 KB pages 33.6, 39.7 GB/s; huge pages 35.7, 31.9 GB/s'."""
    return "; ".join(f"{kind} " + ", ".join(f"{g:.1f}" for g in v) + " GB/s" for kind, v in streams.items())


def bytes_per_step(model: torch.nn.Module, context: int) -> int:
    """Weights every step reads (each distinct parameter once, the embedding table as one row) + the KV cache."""
    config, seen, total = model.config, set(), 0
    embedding = model.get_input_embeddings().weight
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel() * parameter.element_size()
    if embedding is not model.get_output_embeddings().weight:  # untied: the input table is read one row a step
        total -= embedding.numel() * embedding.element_size() - embedding.shape[1] * embedding.element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * 4
    return total + kv


@torch.inference_mode()
def pass_ms(model, cache, context: int, width: int) -> float:
    ids = torch.randint(100, 1000, (1, width))
    positions = torch.arange(context, context + width).unsqueeze(0)
    start = time.perf_counter()
    hidden = model.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).last_hidden_state
    model.get_output_embeddings()(hidden[0])  # the LM head on every position, as a verify pass needs
    elapsed = time.perf_counter() - start
    rollback(cache, context)
    return elapsed * 1e3


@torch.inference_mode()
def step_costs(model, context: int, repeats: int, widths: tuple[int, ...] = WIDTHS, seed: int = 0) -> dict[str, dict[int, float]]:
    """{engine: {width: median ms}}, both engines interleaved round by round, widths shuffled each round."""
    cache = new_cache(model)
    prompt = torch.randint(100, 1000, (1, context), generator=torch.Generator().manual_seed(seed))
    model.model(input_ids=prompt, cache=cache, use_cache=True)
    samples: dict[str, dict[int, list[float]]] = {e: {w: [] for w in widths} for e in ("fast", "transformers")}
    order = random.Random(seed)
    for round_ in range(repeats + 1):  # round 0 warms up and is dropped
        for engine in ("fast", "transformers") if round_ % 2 else ("transformers", "fast"):
            shuffled = list(widths[1:])
            order.shuffle(shuffled)
            if engine == "fast":
                runs = _pairs(model, cache, context, shuffled)
            else:
                with transformers_kernels(model):
                    runs = _pairs(model, cache, context, shuffled)
            if round_:
                for width, ms in runs:
                    samples[engine][width].append(ms)
    STEP_SAMPLES.clear()
    STEP_SAMPLES.update(samples)
    return {e: {w: sorted(v)[len(v) // 2] for w, v in by_width.items()} for e, by_width in samples.items()}


STEP_SAMPLES: dict[str, dict[int, list[float]]] = {}  # the last `step_costs` call's samples, for their spread


def quartiles(values: list[float]) -> tuple[float, float]:
    """(first, third) quartile of `values`, nearest rank: the spread printed beside each median."""
    ordered = sorted(values)
    return ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]


def _pairs(model, cache, context: int, widths: list[int]) -> list[tuple[int, float]]:
    """A 1-token step, then a width-w pass, for each w: as decoding alternates them."""
    runs = []
    for width in widths:
        runs.append((1, pass_ms(model, cache, context, 1)))
        runs.append((width, pass_ms(model, cache, context, width)))
    return runs


@torch.inference_mode()
def profile(model, context: int, widths=(1, 4, 8), top: int = 8) -> dict[int, list[tuple[str, float, float]]]:
    """Per width: the top ops by self CPU time, (name, ms per pass, share of the pass)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cache = new_cache(model)
    model.model(input_ids=torch.randint(100, 1000, (1, context)), cache=cache, use_cache=True)
    out = {}
    for width in widths:
        for _ in range(3):
            pass_ms(model, cache, context, width)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                pass_ms(model, cache, context, width)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        out[width] = [(e.key, e.self_cpu_time_total / 5 / 1e3, e.self_cpu_time_total / total) for e in ranked]
    return out


def plain_decoding(loaded, tokens: int = 64, repeats: int = 7) -> dict[str, float]:
    """Tokens per second of 64-token greedy decoding: transformers' generate, ours (fast), ours (transformers)."""
    model, tok = loaded.model, loaded.tokenizer
    ids = tok("Write a short story about a lighthouse keeper who finds a message in a bottle.",
              return_tensors="pt")["input_ids"]
    config = GenerationConfig(max_new_tokens=tokens, eos_token_ids=())
    warm_up(model, ids)
    pad = model.generation_config.pad_token_id or model.generation_config.eos_token_id

    def hf() -> float:
        start = time.perf_counter()
        with torch.inference_mode(), transformers_kernels(model):
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                           min_new_tokens=tokens, pad_token_id=pad)
        return time.perf_counter() - start

    def ours() -> float:
        return generate(model, ids, config).stats.total_seconds

    def ours_plain_kernels() -> float:
        with transformers_kernels(model):
            return generate(model, ids, config).stats.total_seconds

    runs = {"transformers generate": [], "knnssd (fast kernels)": [], "knnssd (transformers kernels)": []}
    for _ in range(repeats):
        for name, fn in zip(runs, (hf, ours, ours_plain_kernels)):
            runs[name].append(fn())
    return {name: tokens / sorted(v)[len(v) // 2] for name, v in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", default="200,1500")
    parser.add_argument("--widths", default="1-16,24,32", help="widths to time, e.g. 1-16,24,32 (default)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="float32", threads=args.threads)
    model = loaded.model
    print(f"{loaded.name} on {machine_description()}")
    print(f"kernels chosen at load: {loaded.kernels.describe()}")
    result = {"machine": machine_description(), "model": loaded.name, "kernels": loaded.kernels.describe(),
              "contexts": {}}
    streams: dict[str, list[float]] = {}
    result["streams_gbs"] = streams
    for context in (int(c) for c in args.contexts.split(",")):
        widths = parse_widths(args.widths)
        measure_streams(streams)
        costs = step_costs(model, context, args.repeats, widths)
        measure_streams(streams)
        # The floor: the fastest stream seen so far in this run, on either kind of page. The memory's speed drifts
        # (on this machine kind 30-70 GB/s within an hour), so the best seen is the strictest floor.
        bandwidth = max(max(v) for v in streams.values())
        result["bandwidth_gbs"] = bandwidth
        floor = bytes_per_step(model, context) / (bandwidth * 1e9) * 1e3
        result["contexts"][context] = {"floor_ms": floor, "ms": costs, "quartiles_ms": {
            e: {w: quartiles(v) for w, v in by_width.items()} for e, by_width in STEP_SAMPLES.items()}}
        print(f"\ncontext {context}: streams so far {streams_text(streams)}; fastest {bandwidth:.1f} GB/s,"
              f" {bytes_per_step(model, context) / 1e6:.0f} MB a step -> floor "
              f"{floor:.1f} ms")
        plain = min(costs[e][1] for e in costs)
        result["contexts"][context]["floor_speed"] = {e: floor / costs[e][1] for e in costs}
        print("plain step: " + ", ".join(f"{e} {costs[e][1]:.1f} ms = {floor / costs[e][1]:.2f} of the floor's speed"
                                         for e in costs))
        spread = result["contexts"][context]["quartiles_ms"]
        print(f"{'width':>6}" + "".join(f"{e + ' ms [q1, q3]':>28}{'v':>7}" for e in costs) + f"{'v*':>7}")
        for width in widths:
            print(f"{width:>6}" + "".join(
                f"{costs[e][width]:>12.1f} [{spread[e][width][0]:6.1f}, {spread[e][width][1]:6.1f}]"
                f"{costs[e][width] / costs[e][1]:>7.2f}" for e in costs) + f"{costs['fast'][width] / plain:>7.2f}")
    if not args.no_profile:
        result["profile"] = profile(model, 200)
        for width, ops in result["profile"].items():
            print(f"\nprofile, width {width}, context 200 (fast kernels): "
                  + "; ".join(f"{name} {ms:.1f} ms ({share:.0%})" for name, ms, share in ops[:6]))
    result["plain_tokens_per_second"] = plain_decoding(loaded)
    print("\nplain greedy decoding, 64 tokens: " + ", ".join(
        f"{name} {tps:.1f} tok/s" for name, tps in result["plain_tokens_per_second"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
