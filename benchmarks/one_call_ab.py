"""A decoder layer's step in one C++ call (`LayerStep`) against the same kernel calls made one by one: one run.

    python benchmarks/one_call_ab.py [--model smollm2-135m] [--contexts 200,1500] [--widths 1,4,16]
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
from knnssd.engine.fastlayer import calls_one_by_one  # noqa: E402


def ways(model):
    return {"one by one": (model, partial(calls_one_by_one, model)), "one call": (model, nullcontext)}


if __name__ == "__main__":
    one_model_ab(__doc__.splitlines()[0], ways)
