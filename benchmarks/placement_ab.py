"""Weights on huge pages with joined q/k/v and gate/up products, against weights left where they loaded: one run.

    python benchmarks/placement_ab.py [--model smollm2-135m] [--contexts 200,1500] [--widths 1,4,16]
                                      [--rounds 15] [--out FILE.json]

Loads the model twice: "placed" as `load_model` does (`knnssd.engine.weights.place_weights`: one arena advised
onto huge pages, each layer's q, k, v and gate, up adjacent and multiplied in one product) and "in place"
(`accelerate(model, place=False)`: the same kernels, the weights on the 4 KB pages they loaded into, one product
per projection). First the two must agree bit for bit (plain steps and a verify pass of every width asked);
then, per context, passes of each width alternate between the two round by round (the order flipped each round),
as `benchmarks/step_cost.py` times them (the LM head on every position, the cache cropped back after each pass).
Medians with quartiles; the stream bandwidth on both kinds of page before and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_description, write_result  # noqa: E402
from benchmarks.step_cost import measure_streams, pass_ms, quartiles, streams_text  # noqa: E402
from knnssd.engine.kernels import accelerate  # noqa: E402
from knnssd.engine.kvcache import new_cache  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402


@torch.inference_mode()
def prefilled(model, context: int):
    cache = new_cache(model)
    prompt = torch.randint(100, 1000, (1, context), generator=torch.Generator().manual_seed(context))
    model.model(input_ids=prompt, cache=cache, use_cache=True)
    return cache


@torch.inference_mode()
def same_bits(models: dict, widths: list[int]) -> None:
    """Logits of passes of each width after a 40-token prompt must be equal in both models."""
    tokens = torch.randint(100, 1000, (1, max(widths)), generator=torch.Generator().manual_seed(1))
    for width in widths:
        logits = []
        for model in models.values():
            cache = prefilled(model, 40)
            hidden = model.model(input_ids=tokens[:, :width], position_ids=torch.arange(40, 40 + width)[None],
                                 cache=cache, use_cache=True).last_hidden_state
            logits.append(model.get_output_embeddings()(hidden[0]))
        if not torch.equal(*logits):
            raise SystemExit(f"placed and in-place weights differ at width {width}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", default="200,1500")
    parser.add_argument("--widths", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    placed = load_model(args.model, device="cpu", dtype="float32")
    in_place = load_model(args.model, device="cpu", dtype="float32", fast_kernels=False)
    plan = accelerate(in_place.model, place=False)
    models = {"placed": placed.model, "in place": in_place.model}
    print(f"{args.model} on {machine_description()}")
    print(f"placed: {placed.kernels.describe()}\nin place: {plan.describe()}")
    same_bits(models, widths)
    print(f"bits: passes of widths {widths} equal in both")
    streams: dict[str, list[float]] = {}
    measure_streams(streams)
    result: dict = {"machine": machine_description(), "model": args.model, "placed": placed.kernels.describe(),
                    "contexts": {}}
    for context in (int(c) for c in args.contexts.split(",")):
        caches = {label: prefilled(model, context) for label, model in models.items()}
        samples = {label: {w: [] for w in widths} for label in models}
        for round_ in range(args.rounds + 1):  # round 0 warms up and is dropped
            for label in (models if round_ % 2 else reversed(list(models))):
                for width in widths:
                    ms = pass_ms(models[label], caches[label], context, width)
                    if round_:
                        samples[label][width].append(ms)
        table = {label: {w: (quartiles(v)[0], sorted(v)[len(v) // 2], quartiles(v)[1]) for w, v in by.items()}
                 for label, by in samples.items()}
        result["contexts"][context] = table
        print(f"\ncontext {context} (ms, median [q1, q3] of {args.rounds} rounds, alternating)")
        print(f"{'width':>6}{'in place':>24}{'placed':>24}{'placed/in place':>17}")
        for width in widths:
            cells = [f"{table[label][width][1]:8.1f} [{table[label][width][0]:5.1f}, {table[label][width][2]:5.1f}]"
                     for label in ("in place", "placed")]
            print(f"{width:>6}{cells[0]:>24}{cells[1]:>24}"
                  f"{table['placed'][width][1] / table['in place'][width][1]:>17.2f}")
    measure_streams(streams)
    result["streams_gbs"] = streams
    print(f"\nstream, before and after: {streams_text(streams)}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
