"""A pass's layer steps from one loop (`knnssd.engine.fastpass`) against each layer by its own module call: one run.

    python benchmarks/pass_ab.py [--model smollm2-135m] [--contexts 200,1500] [--widths 1,4,16]
                                 [--rounds 15] [--out FILE.json]

One model, a cache for each way, bits first, then paired timings: `benchmarks/ab.py`.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ab import one_model_ab  # noqa: E402
from knnssd.engine.fastpass import layer_by_layer  # noqa: E402


def ways(model):
    return {"layer by layer": (model, partial(layer_by_layer, model)), "one loop": (model, nullcontext)}


if __name__ == "__main__":
    one_model_ab(__doc__.splitlines()[0], ways)
