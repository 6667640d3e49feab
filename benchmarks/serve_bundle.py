"""A hand-made SmolLM2 routing bundle for the serving benchmark, where no calibrated one is at hand.

One domain per Spec-Bench category, anchors from the prompt embeddings of the category's last `--per-category`
prompts (serve_bench.py asks the first ones), and one policy for every domain (default: prompt lookup, n-grams of
1-3, at most 8 draft tokens; what section 21's calibrated bundle routed every domain to). It is not calibrated:
it measures how the server batches and drafts, not what calibration chooses. Minutes to build (one prefill per
prompt).

    python benchmarks/serve_bundle.py OUT_FOLDER [--per-category 4] [--policy '{"kind": "prompt_lookup"}']
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_spec_bench  # noqa: E402
from knnssd.bundle import write_bundle  # noqa: E402
from knnssd.engine.decoding import prefill  # noqa: E402
from knnssd.engine.models import load_model  # noqa: E402
from knnssd.engine.prompts import encode_prompt  # noqa: E402
from knnssd.engine.sampling import SamplingConfig  # noqa: E402
from pipeline.reduce import ReduceConfig, build_bundle_spec  # noqa: E402

DEFAULT_POLICY = {"kind": "prompt_lookup", "max_ngram": 3, "min_ngram": 1, "max_draft_tokens": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the bundle to (must not exist)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=None, help="Spec-Bench question.jsonl (default: ../shared/data/...)")
    parser.add_argument("--per-category", type=int, default=4)
    parser.add_argument("--policy", default=json.dumps(DEFAULT_POLICY), help="the policy of every domain (JSON)")
    args = parser.parse_args()
    loaded = load_model(args.model)
    rows = load_spec_bench(args.data)
    categories = sorted({row["category"] for row in rows})
    texts = [(c, row["turns"][0]) for c in categories
             for row in [r for r in rows if r["category"] == c][-args.per_category:]]
    embeddings = []
    for i, (_, text) in enumerate(texts):
        ids = encode_prompt(loaded.tokenizer, text, chat=True)
        embeddings.append(prefill(loaded.model, ids, SamplingConfig(), None, lambda: 0.0).embedding.numpy())
        print(f"\rembedded {i + 1}/{len(texts)} prompts", end="", flush=True)
    print()
    policy = json.loads(args.policy)
    spec = build_bundle_spec(
        model_id=loaded.source, model_hash=loaded.model_hash, embeddings=np.stack(embeddings),
        labels=[c for c, _ in texts], policies={c: policy for c in categories},
        metrics={c: {} for c in categories}, config=ReduceConfig(anchors_per_domain=2),
        prompt_format={"chat": True}, calibration={"tag": "serve-bench-hand-made", "policy": policy})
    print(write_bundle(spec, Path(args.out)))


if __name__ == "__main__":
    main()
