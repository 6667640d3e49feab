"""`--corpus DOMAIN=PATH` wired into calibration (pipeline/corpus.py, pipeline/store_stage.py, jobs/calibrate.py):
bad corpora refused before Ray starts, each text tokenised into store entries no leave-one-out drops, and a
tiny-model calibration whose bundle's store for the domain ends with the corpus tokens."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from knnssd.errors import KnnSsdError
from pipeline.corpus import (CORPUS_KEY, check_corpus_tokens, corpus_entries, corpus_record, read_corpus)
from pipeline.data import HELD_OUT, load_calibration_table, prompts_of
from pipeline.stores import DomainStore
from pipeline.tasks import ModelSpec
from tests.test_calibrate_job import job_args, run_job, tiny  # noqa: F401  (tiny: the module fixture)

# words of the tiny model's word-level vocabulary ("tN" is id N) that neither domain's prompts use
TEXTS = ["t40 t41 t42 t43 t44 t45", "  ", "t50 t51 t52"]
IDS = [tuple(range(40, 46)), (50, 51, 52)]


def write_corpus(path, texts=TEXTS):
    path.write_text("\n".join(json.dumps(t if i % 2 == 0 else {"text": t}) for i, t in enumerate(texts)) + "\n")
    return path


def test_corpus_texts_become_store_entries_leave_one_out_keeps(tiny, tmp_path):
    corpus = read_corpus("low", write_corpus(tmp_path / "c.jsonl"))
    keys, outputs = corpus_entries(ModelSpec(name=str(tiny / "model"), chat=False), corpus)
    assert list(outputs) == IDS  # plain text, no special tokens (the tokenizer's EOS is t2)
    sha8 = hashlib.sha256((tmp_path / "c.jsonl").read_bytes()).hexdigest()[:8]
    assert keys == (f"{CORPUS_KEY}{sha8}:1", f"{CORPUS_KEY}{sha8}:2")
    prompts = ("t3 t4 t5", "t6 t7")
    store = DomainStore("low", prompts + keys, ((3, 4), (5,)) + outputs)
    for prompt in prompts:  # a trial on a calibration prompt drafts from every corpus entry
        assert all(o in store.arrays(exclude=prompt) for o in IDS)
    assert corpus_record(corpus, store) == {"domain": "low", "file": "c.jsonl", "sha256": corpus.sha256,
                                            "texts": 2, "tokens": 9}
    check_corpus_tokens(corpus, 9, limit=9)
    with pytest.raises(KnnSsdError, match=r"corpus .*c\.jsonl \(domain 'low'\) is 10 tokens, over the bound of 9"):
        check_corpus_tokens(corpus, 10, limit=9)


def held_out_prompt(tiny, work) -> str:
    """A held-out prompt of the split the job makes from `job_args`."""
    from jobs.calibrate import build_parser, config_from_args

    table = load_calibration_table(config_from_args(build_parser().parse_args(job_args(tiny, work))).data, 1)
    return prompts_of(table, "high", HELD_OUT)[0]


@pytest.mark.parametrize("case, words", [
    ("bad-form", "--corpus 'low' is not DOMAIN=PATH"),
    ("unknown-domain", "--corpus names domain 'code', which is not in the data (its domains: low, high)"),
    ("missing", "corpus file {tmp}/none.jsonl (for domain 'low') does not exist"),
    ("held-out", "corpus {tmp}/c.jsonl text 2 contains the held-out prompt"),
])
def test_bad_corpora_fail_before_ray_starts(tiny, tmp_path, capsys, case, words):
    import ray

    from jobs.calibrate import main

    work = tmp_path / "w"
    corpus = write_corpus(tmp_path / "c.jsonl", ["t40 t41", f"Answer:  {held_out_prompt(tiny, work)} "]
                          if case == "held-out" else TEXTS)
    item = {"bad-form": "low", "unknown-domain": f"code={corpus}", "missing": f"low={tmp_path / 'none.jsonl'}"
            }.get(case, f"low={corpus}")
    assert main([*job_args(tiny, work), "--corpus", item]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words.format(tmp=tmp_path) in err and "(fix: " in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not ray.is_initialized() and not (work / "optuna-journal.log").exists()


def test_a_relative_corpus_is_refused_inside_a_ray_job(tiny, tmp_path, capsys, monkeypatch):
    from jobs.calibrate import main
    from pipeline.cluster import JOB_CONFIG_ENV

    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0.zip"}}))
    monkeypatch.chdir(tmp_path)
    assert main([*job_args(tiny, tmp_path / "w"), "--corpus", "low=mine/c.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "--corpus low=mine/c.jsonl does not exist in this Ray job's working directory" in err
    assert '--corpus low="$PWD/mine/c.jsonl"' in err and "Traceback" not in err


def test_calibration_with_a_corpus_ships_its_tokens_in_the_domain_store(tiny, tmp_path):
    work = tmp_path / "w"
    corpus = write_corpus(tmp_path / "c.jsonl")
    proc = run_job(job_args(tiny, work, "--trials", "2", "--no-mix", "--validate-prompts", "1", "--bundle-name",
                            "corp", "--corpus", f"low={corpus}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "store: [low] + corpus c.jsonl: 2 texts, 9 tokens" in proc.stdout
    (bundle,) = (work / "bundles").iterdir()
    manifest = json.loads((bundle / "manifest.json").read_text())
    import pyarrow.parquet as pq

    from knnssd.bundle.stores import split_store

    data = pq.read_table(work / "data.parquet").to_pylist()
    calibration = {d: sum(r["domain"] == d and r["split"] == "calibration" for r in data) for d in ("low", "high")}
    stores = {s["domain"]: split_store(np.load(bundle / s["file"], allow_pickle=False)) for s in manifest["stores"]}
    # the model's outputs first, one per calibration prompt, then the corpus texts' tokens; high has no corpus
    assert len(stores["low"]) == calibration["low"] + 2 and stores["low"][-2:] == IDS
    assert len(stores["high"]) == calibration["high"] and not set(IDS) & set(stores["high"])
    record = manifest["calibration"]["stores"]["corpora"]
    sha256 = hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert record == [{"domain": "low", "file": "c.jsonl", "sha256": sha256, "texts": 2, "tokens": 9}]
    listing = (bundle / "manifest.json").read_text()
    assert "t40 t41" not in listing and str(tmp_path) not in listing  # noted, never copied; no local path
    from registry.mlflow_store import BundleRegistry

    registry = BundleRegistry(f"sqlite:///{work}/mlflow.db")
    run = registry.client.get_run(registry.client.get_model_version("corp", "1").run_id)
    assert run.data.params["corpus.low"] == f"c.jsonl {sha256[:16]}"


def test_corpus_entries_keep_the_store_warm_table_as_the_model_decoded_it():
    """A corpus text joins the store's drafting text but writes no successor row: the warm table is the model's
    own outputs' table, and a row for a token the corpus also holds is not wiped."""
    model_store = DomainStore(domain="low", prompts=("p0",), outputs=((5, 6, 7),),
                              successors=(((6, 1), (7, 2), (8, 3)),), vocab=20)
    joined = DomainStore(domain="low", prompts=("p0", CORPUS_KEY + "ab:1"), outputs=((5, 6, 7), (6, 5)),
                         successors=(((6, 1), (7, 2), (8, 3)), ()), vocab=20)
    assert np.array_equal(joined.table().table, model_store.table().table)
    assert joined.table().table[6].tolist() == [7, 2]
    assert joined.arrays() == [(5, 6, 7), (6, 5)]
    with pytest.raises(ValueError, match="one row per output token"):
        DomainStore(domain="low", prompts=("p0",), outputs=((5, 6, 7),), successors=(((6,), (7,)),), vocab=20)


def test_stores_a_bundle_could_not_hold_are_refused_before_the_searches():
    from pipeline.store_stage import check_store_total

    stores = {"low": DomainStore(domain="low", prompts=("p0", CORPUS_KEY + "ab:1"), outputs=((5, 6, 7), (6, 5))),
              "high": DomainStore(domain="high", prompts=("p1",), outputs=((9,),))}
    check_store_total(stores, limit=9)  # 3 + 1, 2 + 1, 1 + 1 entries
    with pytest.raises(KnnSsdError, match="9 entries in all, more than a bundle holds \\(8\\)"):
        check_store_total(stores, limit=8)
