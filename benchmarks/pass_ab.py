"""A pass's decoder layers from one loop (`knnssd.engine.fastpass`) against each layer by its own module call
(`fastlayer.fast_step`, one `LayerStep` call each): one run.

    python benchmarks/pass_ab.py [--model smollm2-135m] [--contexts 200,1500] [--widths 1,4,16]
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
from knnssd.engine.fastpass import layer_by_layer  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    loaded = load_model(args.model, device="cpu", dtype="float32")
    model = loaded.model
    print(f"{args.model} on {machine_description()}\nkernels: {loaded.kernels.describe()}")
    compare({"layer by layer": (model, partial(layer_by_layer, model)), "one loop": (model, nullcontext)}, args,
            {"machine": machine_description(), "model": args.model, "kernels": loaded.kernels.describe()})


if __name__ == "__main__":
    main()
