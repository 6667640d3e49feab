"""One call against many for the same step, one model, bits first, then paired timings (`benchmarks/ab.py`), one run.

    python benchmarks/one_call_ab.py [--ways layer|pass] [--model smollm2-135m] [--contexts 200,1500]
                                     [--widths 1,4,16] [--rounds 15] [--out FILE.json]

--ways layer (the default): a decoder layer's step in one C++ call (`LayerStep`) against the same kernel calls made
one by one (`fastlayer.calls_one_by_one`). --ways pass: a pass's layer steps from one loop (`knnssd.engine.fastpass`)
against each layer by its own module call (`fastpass.layer_by_layer`).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ab import one_model_ab  # noqa: E402
from knnssd.engine.fastlayer import calls_one_by_one  # noqa: E402
from knnssd.engine.fastpass import layer_by_layer  # noqa: E402

COMPARISONS = {
    "layer": lambda model: {"one by one": (model, partial(calls_one_by_one, model)), "one call": (model, nullcontext)},
    "pass": lambda model: {"layer by layer": (model, partial(layer_by_layer, model)), "one loop": (model, nullcontext)},
}


def main() -> None:
    one_model_ab(__doc__.splitlines()[0], COMPARISONS)


if __name__ == "__main__":
    main()
