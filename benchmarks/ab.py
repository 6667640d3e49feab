"""Two ways of running the same passes: compared bit for bit, then timed alternately round by round, in one run.

A way is a model and a context to enter around its passes (`contextlib.nullcontext` for none). Used by
`benchmarks/placement_ab.py` (two models: weights placed or in place) and `benchmarks/one_call_ab.py` (one model:
the layer step in one call or its calls one by one; the pass's layer steps from one loop or each layer by its own
call). Passes are timed as `benchmarks/step_cost.py` times them:
the LM head on every position, the cache cropped back after each pass.
"""

from __future__ import annotations

import argparse
from typing import Callable, ContextManager

import torch
from torch import nn

from benchmarks.common import write_result
from benchmarks.step_cost import measure_streams, pass_ms, quartiles, streams_text
from knnssd.engine.kvcache import new_cache

Way = tuple[nn.Module, Callable[[], ContextManager]]  # (model, a context to enter around its passes)


@torch.inference_mode()
def prefilled(model: nn.Module, context: int):
    """A cache holding a random `context`-token prompt (the same prompt for every way)."""
    cache = new_cache(model)
    prompt = torch.randint(100, 1000, (1, context), generator=torch.Generator().manual_seed(context))
    model.model(input_ids=prompt, cache=cache, use_cache=True)
    return cache


@torch.inference_mode()
def first_difference(ways: dict[str, Way], widths: list[int]) -> int | None:
    """The first width whose logits (a pass after a 40-token prompt) differ between the ways; None if none does."""
    tokens = torch.randint(100, 1000, (1, max(widths)), generator=torch.Generator().manual_seed(1))
    for width in widths:
        logits = []
        for model, context in ways.values():
            with context():
                cache = prefilled(model, 40)
                hidden = model.model(input_ids=tokens[:, :width], position_ids=torch.arange(40, 40 + width)[None],
                                     cache=cache, use_cache=True).last_hidden_state
                logits.append(model.get_output_embeddings()(hidden[0]))
        if not all(torch.equal(logits[0], other) for other in logits[1:]):
            return width
    return None


def alternate(ways: dict[str, Way], context: int, widths: list[int], rounds: int
              ) -> dict[str, dict[int, tuple[float, float, float]]]:
    """{way: {width: (first quartile, median, third quartile) ms}}, and for two ways also {"paired": {width: the
    same of the second way's time over the first's, round by round}}. Each round runs every width's pass in each
    way back to back (the ways' order flipped each round; round 0 warms up and is dropped), so a pair of passes
    sees the same state of the machine: the memory's speed here can halve and recover within seconds, which
    widens each way's own spread far more than the paired ratio's."""
    caches = {label: prefilled(model, context) for label, (model, _) in ways.items()}
    samples: dict[str, dict[int, list[float]]] = {label: {w: [] for w in widths} for label in ways}
    for round_ in range(rounds + 1):
        for width in widths:
            for label in (list(ways) if round_ % 2 else list(reversed(list(ways)))):
                model, enter = ways[label]
                with enter():
                    ms = pass_ms(model, caches[label], context, width)
                if round_:
                    samples[label][width].append(ms)
    table = {label: {w: spread(v) for w, v in by.items()} for label, by in samples.items()}
    if len(ways) == 2:
        before, after = (samples[label] for label in ways)
        table["paired"] = {w: spread([a / b for a, b in zip(after[w], before[w])]) for w in widths}
    return table


def spread(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile), nearest rank."""
    return quartiles(values)[0], sorted(values)[len(values) // 2], quartiles(values)[1]


def print_table(table: dict[str, dict[int, tuple[float, float, float]]], before: str, after: str, context: int,
                rounds: int) -> None:
    """Median [q1, q3] per width for `before` and `after`, the ratio of the medians, and the median [q1, q3] of
    the rounds' paired ratios."""
    print(f"\ncontext {context} (ms, median [q1, q3] of {rounds} rounds, alternating)")
    ratio = f"{after}/{before}"
    print(f"{'width':>6}{before:>24}{after:>24}{ratio:>{max(17, len(ratio) + 2)}}{'paired [q1, q3]':>24}")
    for width in table[before]:
        cells = [f"{table[label][width][1]:8.1f} [{table[label][width][0]:5.1f}, {table[label][width][2]:5.1f}]"
                 for label in (before, after)]
        q1, median, q3 = table["paired"][width]
        print(f"{width:>6}{cells[0]:>24}{cells[1]:>24}"
              f"{table[after][width][1] / table[before][width][1]:>{max(17, len(ratio) + 2)}.2f}"
              f"{f'{median:.3f} [{q1:.3f}, {q3:.3f}]':>24}")


def arguments(description: str, ways: list[str] | None = None) -> argparse.Namespace:
    """The options the A/B scripts take: --model, --contexts, --widths, --rounds, --out, and --ways where a script
    offers several comparisons (`ways`, the first the default)."""
    parser = argparse.ArgumentParser(description=description)
    if ways:
        parser.add_argument("--ways", choices=ways, default=ways[0], help="which two ways to compare")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", default="200,1500")
    parser.add_argument("--widths", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def compare(ways: dict[str, Way], args: argparse.Namespace, result: dict) -> None:
    """The whole A/B of two ways (the first is the baseline): bits first (exits where they differ), then every
    context's alternating timings between stream measurements; printed, and written to args.out with `result`'s
    header fields."""
    widths = [int(w) for w in args.widths.split(",")]
    before, after = ways
    differs = first_difference(ways, widths)
    if differs is not None:
        raise SystemExit(f"{before} and {after} differ at width {differs}")
    print(f"bits: passes of widths {widths} equal both ways")
    streams: dict[str, list[float]] = {}
    measure_streams(streams)
    result["contexts"] = {}
    for context in (int(c) for c in args.contexts.split(",")):
        result["contexts"][context] = table = alternate(ways, context, widths, args.rounds)
        print_table(table, before, after, context, args.rounds)
    measure_streams(streams)
    result["streams_gbs"] = streams
    print(f"\nstream, before and after: {streams_text(streams)}")
    write_result(args.out, result)


def one_model_ab(description: str, comparisons: dict[str, Callable[[nn.Module], dict[str, Way]]]) -> None:
    """The whole A/B of two ways of running one model, `comparisons[--ways](model)` (the baseline first): the
    options (`arguments`), the model loaded as `load_model` loads it, then `compare`."""
    from benchmarks.common import machine_description
    from knnssd.engine.models import load_model

    args = arguments(description, list(comparisons))
    loaded = load_model(args.model, device="cpu", dtype="float32")
    print(f"{args.model} on {machine_description()}\nkernels: {loaded.kernels.describe()}")
    compare(comparisons[args.ways](loaded.model), args,
            {"machine": machine_description(), "model": args.model, "kernels": loaded.kernels.describe(),
             "ways": args.ways})
