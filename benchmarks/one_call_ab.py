"""A decoder layer's step in one C++ call (`LayerStep`) against the same kernel calls made one by one: one run.

    python benchmarks/one_call_ab.py [--model smollm2-135m] [--contexts 200,1500] [--widths 1,4,16]
                                     [--rounds 15] [--out FILE.json]

One model, a cache for each way (`benchmarks/ab.py`). First the two must agree bit for bit (a pass of every width
asked); then, per context, each round runs every width's pass both ways back to back (the order flipped each
round), timed as `benchmarks/step_cost.py` times them (the LM head on every position, the cache cropped back after
each pass). Medians with quartiles, and the median [q1, q3] of the rounds' paired ratios (the figure to read when
the memory's speed moves during the run); the stream bandwidth on both kinds of page before and after.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ab import arguments, compare  # noqa: E402
from benchmarks.common import machine_description  # noqa: E402
from knnssd.engine.fastlayer import calls_one_by_one  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    loaded = load_model(args.model, device="cpu", dtype="float32")
    model = loaded.model
    print(f"{args.model} on {machine_description()}\nkernels: {loaded.kernels.describe()}")
    compare({"one by one": (model, partial(calls_one_by_one, model)), "one call": (model, nullcontext)}, args,
            {"machine": machine_description(), "model": args.model, "kernels": loaded.kernels.describe()})


if __name__ == "__main__":
    main()
