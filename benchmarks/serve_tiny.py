"""A tiny random model and its routing bundle for `serve_bench.py --smoke` without --bundle: the tests' serving
model (4 layers, hidden 64, a 128-word vocabulary, a chat template, no EOS, so every answer runs to max_tokens) and
the tests' two-domain layer-skip bundle over it. Seconds to build; it checks the benchmark's set-up (servers, ports,
streaming, /metrics, the report), not any speed. Its word-level vocabulary (t0..t127) reads Spec-Bench's English as
unknown tokens and answers it with special tokens only (empty text), so the smoke run asks the tests' own prompts
(`tiny_prompts`), whose answers are real words to time and compare.

    python benchmarks/serve_tiny.py FOLDER      # writes FOLDER/model and FOLDER/bundle, prints the bundle path
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_tiny_bundle(folder: Path) -> Path:
    """FOLDER/model (the saved tiny model) and FOLDER/bundle (its bundle, model_id = the model's path)."""
    from knnssd.engine.models import load_model
    from tests.bundles import tiny_bundle
    from tests.serving import save_serving_model

    model = save_serving_model(folder / "model")
    return tiny_bundle(load_model(str(model), device="cpu", threads=1), folder / "bundle", tag="serve-bench-smoke")


def tiny_prompts(count: int) -> list[tuple[str, str]]:
    """`count` prompts in the tiny vocabulary as (domain, text), alternating the bundle's two domains."""
    from tests.bundles import TINY_PROMPTS

    domains = sorted(TINY_PROMPTS)
    return [(d, TINY_PROMPTS[d][(i // len(domains)) % len(TINY_PROMPTS[d])])
            for i in range(count) for d in [domains[i % len(domains)]]]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/serve_tiny.py FOLDER")
    print(write_tiny_bundle(Path(sys.argv[1])))
