"""A decoder layer's step in one C++ call (`LayerStep`) against the same kernel calls made one by one: one run.

    python benchmarks/one_call_ab.py [--model smollm2-135m] [--contexts 200,1500] [--widths 1,4,16]
                                     [--rounds 15] [--out FILE.json]

One model, one cache. First the two must agree bit for bit (plain steps and a pass of every width asked); then,
per context, passes of each width alternate between the two round by round (the order flipped each round), timed
as `benchmarks/step_cost.py` times them (the LM head on every position, the cache cropped back after each pass).
Medians with quartiles; the stream bandwidth on both kinds of page before and after.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_description, write_result  # noqa: E402
from benchmarks.placement_ab import prefilled  # noqa: E402
from benchmarks.step_cost import measure_streams, pass_ms, quartiles, streams_text  # noqa: E402
from knnssd.engine.fastlayer import calls_one_by_one  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402

WAYS = ("one by one", "one call")


def way(model, label: str):
    return calls_one_by_one(model) if label == "one by one" else nullcontext()


@torch.inference_mode()
def same_bits(model, widths: list[int]) -> None:
    """Logits of passes of each width after a 40-token prompt must be equal both ways."""
    tokens = torch.randint(100, 1000, (1, max(widths)), generator=torch.Generator().manual_seed(1))
    for width in widths:
        logits = []
        for label in WAYS:
            with way(model, label):
                cache = prefilled(model, 40)
                hidden = model.model(input_ids=tokens[:, :width], position_ids=torch.arange(40, 40 + width)[None],
                                     cache=cache, use_cache=True).last_hidden_state
                logits.append(model.get_output_embeddings()(hidden[0]))
        if not torch.equal(*logits):
            raise SystemExit(f"one call and one by one differ at width {width}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", default="200,1500")
    parser.add_argument("--widths", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    loaded = load_model(args.model, device="cpu", dtype="float32")
    model = loaded.model
    print(f"{args.model} on {machine_description()}\nkernels: {loaded.kernels.describe()}")
    same_bits(model, widths)
    print(f"bits: passes of widths {widths} equal both ways")
    streams: dict[str, list[float]] = {}
    measure_streams(streams)
    result: dict = {"machine": machine_description(), "model": args.model, "kernels": loaded.kernels.describe(),
                    "contexts": {}}
    for context in (int(c) for c in args.contexts.split(",")):
        cache = prefilled(model, context)
        samples = {label: {w: [] for w in widths} for label in WAYS}
        for round_ in range(args.rounds + 1):  # round 0 warms up and is dropped
            for label in (WAYS if round_ % 2 else reversed(WAYS)):
                with way(model, label):
                    for width in widths:
                        ms = pass_ms(model, cache, context, width)
                        if round_:
                            samples[label][width].append(ms)
        table = {label: {w: (quartiles(v)[0], sorted(v)[len(v) // 2], quartiles(v)[1]) for w, v in by.items()}
                 for label, by in samples.items()}
        result["contexts"][context] = table
        print(f"\ncontext {context} (ms, median [q1, q3] of {args.rounds} rounds, alternating)")
        print(f"{'width':>6}{'one by one':>24}{'one call':>24}{'one call/one by one':>21}")
        for width in widths:
            cells = [f"{table[label][width][1]:8.1f} [{table[label][width][0]:5.1f}, {table[label][width][2]:5.1f}]"
                     for label in WAYS]
            print(f"{width:>6}{cells[0]:>24}{cells[1]:>24}"
                  f"{table['one call'][width][1] / table['one by one'][width][1]:>21.2f}")
    measure_streams(streams)
    result["streams_gbs"] = streams
    print(f"\nstream, before and after: {streams_text(streams)}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
