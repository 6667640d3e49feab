"""Weights on huge pages with joined q/k/v and gate/up products, against weights left where they loaded: one run.

    python benchmarks/placement_ab.py [--model smollm2-135m] [--contexts 200,1500] [--widths 1,4,16]
                                      [--rounds 15] [--out FILE.json]

Loads the model twice: "placed" as `load_model` does (`knnssd.engine.weights.place_weights`: one arena advised
onto huge pages, each layer's q, k, v and gate, up adjacent and multiplied in one product) and "in place"
(`accelerate(model, place=False)`: the same kernels, the weights on the 4 KB pages they loaded into, one product
per projection). First the two must agree bit for bit (plain steps and a verify pass of every width asked);
then, per context, each round runs every width's pass both ways back to back (the order flipped each round), timed
as `benchmarks/step_cost.py` times them (the LM head on every position, the cache cropped back after each pass).
Medians with quartiles, and the median [q1, q3] of the rounds' paired ratios; the stream bandwidth on both kinds
of page before and after.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ab import arguments, compare  # noqa: E402
from benchmarks.common import machine_description  # noqa: E402
from knnssd.engine.kernels import accelerate  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    placed = load_model(args.model, device="cpu", dtype="float32")
    in_place = load_model(args.model, device="cpu", dtype="float32", fast_kernels=False)
    plan = accelerate(in_place.model, place=False)
    print(f"{args.model} on {machine_description()}")
    print(f"placed: {placed.kernels.describe()}\nin place: {plan.describe()}")
    compare({"in place": (in_place.model, nullcontext), "placed": (placed.model, nullcontext)}, args,
            {"machine": machine_description(), "model": args.model, "placed": placed.kernels.describe()})


if __name__ == "__main__":
    main()
