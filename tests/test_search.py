"""Search settings that decide what a study is and what it sees (no Ray, no model)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from knnssd.drafters import LayerSkipConfig, PromptLookupConfig
from knnssd.errors import KnnSsdError
from pipeline.calibrate import mix_search, mixed_prompts
from pipeline.search import SearchConfig, seed_trials, study_name


def test_a_study_is_named_by_its_prompts_too():
    config = SearchConfig()
    a = study_name("f" * 64, "coding", config, ["write a sort", "fix this bug"])
    assert a == study_name("f" * 64, "coding", config, ["write a sort", "fix this bug"])
    assert a != study_name("f" * 64, "coding", config, ["write a sort", "fix that bug"])  # other data: other study
    assert a != study_name("f" * 64, "coding", SearchConfig(max_new_tokens=64), ["write a sort", "fix this bug"])


def test_the_mix_study_sees_every_domain_evenly():
    domains = [f"d{i}" for i in range(6)]
    table = pa.table({"domain": [d for d in domains for _ in range(5)],
                      "prompt": [f"{d}-{j}" for d in domains for j in range(5)], "split": ["calibration"] * 30})
    search = mix_search(SearchConfig(prompts_per_trial=4), len(domains))
    seen = mixed_prompts(table)[:search.prompts_per_trial]
    assert search.prompts_per_trial == 6 and sorted(p.split("-")[0] for p in seen) == domains
    assert mix_search(SearchConfig(prompts_per_trial=8), 3).prompts_per_trial == 9


@pytest.mark.parametrize("seed, words", [
    ({"seed_layer_skip": LayerSkipConfig(threshold=0.85)}, "not on the search grid"),
    ({"seed_layer_skip": LayerSkipConfig(max_draft_tokens=20)}, "outside the searched range"),
    ({"seed_lookup": PromptLookupConfig(max_ngram=6)}, "outside the searched range"),
])
def test_seeds_off_the_search_space_are_refused(seed, words):
    with pytest.raises(KnnSsdError, match=words):
        SearchConfig(**seed)


def test_seed_trials_carry_the_seed_configs():
    config = SearchConfig(seed_lookup=PromptLookupConfig(max_ngram=2, max_draft_tokens=7))
    lookup = next(t for t in seed_trials(30, config) if t["kind"] == "prompt_lookup")
    assert lookup["prompt_lookup.max_ngram"] == 2 and lookup["prompt_lookup.max_draft_tokens"] == 7
