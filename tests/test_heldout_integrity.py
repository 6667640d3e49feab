"""Held-out integrity: evaluation refuses data that does not split as the bundle's calibration did (a prompt held
out now could be a calibration prompt whose own output sits in a store), before any model loads; duplicates never
straddle the split; the store stage's input holds calibration prompts only."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from jobs.evaluate import evaluation_prompts, main as evaluate_main
from knnssd.bundle import join_store
from knnssd.errors import KnnSsdError
from pipeline.data import (CALIBRATION, HELD_OUT, DataConfig, data_fingerprint, domains_of, load_calibration_table,
                           normalise_prompt, prompts_of)
from tests.bundles import TINY_PROMPTS, loaded, tiny_bundle  # noqa: F401 (fixture)

PER_TRIAL = 2
NEW_TOKENS = 8


def calibration_record(config: DataConfig, prompts_per_trial: int = PER_TRIAL) -> dict:
    """What calibration records in the manifest about its data (pipeline/calibrate.py): the settings, the
    search's prompts per trial, and the split's fingerprint."""
    table = load_calibration_table(config, min_calibration=prompts_per_trial)
    return {"data": asdict(config), "search": {"prompts_per_trial": prompts_per_trial},
            "provenance": {"data.fingerprint": data_fingerprint(table)}}


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("\n".join(json.dumps({"domain": d, "prompt": p}) for d, p in rows) + "\n")
    return path


ROWS_A = [(d, t) for d, ts in TINY_PROMPTS.items() for t in ts]


def store_outputs(loaded, prompts: list[str]) -> list[tuple[int, ...]]:
    from pipeline.stores import build_outputs

    ids = [loaded.tokenizer(t, return_tensors="pt")["input_ids"] for t in prompts]
    return build_outputs(loaded.model, ids, NEW_TOKENS)


@pytest.fixture(scope="module")
def calibrated(loaded, tmp_path_factory):
    """File A, a bundle "calibrated" on it (the split's fingerprint recorded, each domain's store the model's own
    output of A's calibration prompts, as the store stage makes it), whose model id names no model: a run that
    got as far as loading the model would fail on that instead."""
    tmp = tmp_path_factory.mktemp("heldout")
    data_a = write_jsonl(tmp / "a.jsonl", ROWS_A)
    config = DataConfig(path=str(data_a), held_out_fraction=0.34)
    table = load_calibration_table(config, min_calibration=PER_TRIAL)
    stores = {d: join_store(store_outputs(loaded, prompts_of(table, d, CALIBRATION))) for d in domains_of(table)}
    folder = tiny_bundle(loaded, tmp / "bundle", calibration=calibration_record(config), stores=stores,
                         model_id=str(tmp / "no-such-model"))
    return tmp, config, table, folder


def run_job(folder: Path, *extra: str) -> list[str]:
    return ["--bundle", str(folder), "--max-new-tokens", "4", "--no-log", "--peers", "none", "--streams", "task",
            *extra]


def test_a_held_out_answer_in_a_store_is_refused_before_the_model_loads(calibrated, tmp_path, capsys):
    """File B is file A plus one prompt: it splits otherwise, so a prompt B holds out is one whose output A's
    calibration stored. Evaluating on B is refused, naming both fingerprints and the fix; on A it passes the
    check and goes on to load the model (which this bundle does not have)."""
    tmp, config, table_a, folder = calibrated
    manifest = json.loads((folder / "manifest.json").read_text())
    stored = {(d, normalise_prompt(p)) for d in domains_of(table_a) for p in prompts_of(table_a, d, CALIBRATION)}
    leaking = None
    for i in range(len(ROWS_A)):  # the first place of an added prompt where a stored prompt becomes held out
        data_b = write_jsonl(tmp_path / f"b{i}.jsonl", ROWS_A[:i] + [("low", "t3 t4 t5 extra")] + ROWS_A[i:])
        table_b = load_calibration_table(replace(config, path=str(data_b)), min_calibration=PER_TRIAL)
        held_b = {(d, normalise_prompt(p)) for d in domains_of(table_b) for p in prompts_of(table_b, d, HELD_OUT)}
        if held_b & stored:
            leaking = data_b, table_b
            break
    assert leaking is not None, "no added prompt moved a stored prompt into the held-out split"
    data_b, table_b = leaking
    recorded = manifest["calibration"]["provenance"]["data.fingerprint"]
    assert evaluate_main(run_job(folder, "--data", str(data_b))) == 2
    err = capsys.readouterr().err
    assert f"splits to fingerprint {data_fingerprint(table_b)}, but the bundle was calibrated on data with " \
           f"fingerprint {recorded}" in err
    assert "pass the exact file the bundle was calibrated on" in err and "no-such-model" not in err
    with pytest.raises(KnnSsdError, match="fingerprint"):  # --allow-unverified-data never excuses a mismatch
        evaluation_prompts(manifest, str(data_b), None, allow_unverified=True)
    assert evaluate_main(run_job(folder, "--data", str(config.path))) == 2  # the check passes; the model is next
    assert "no-such-model" in capsys.readouterr().err


def test_a_changed_prompt_is_refused_and_a_duplicate_is_harmless(calibrated, tmp_path):
    tmp, config, table_a, folder = calibrated
    manifest = json.loads((folder / "manifest.json").read_text())
    held_a = [(d, p) for d in domains_of(table_a) for p in prompts_of(table_a, d, HELD_OUT)]
    changed = [(d, p + " t9" if i == 3 else p) for i, (d, p) in enumerate(ROWS_A)]
    with pytest.raises(KnnSsdError, match="but the bundle was calibrated on data with fingerprint"):
        evaluation_prompts(manifest, str(write_jsonl(tmp_path / "changed.jsonl", changed)), None)
    # a held-out prompt repeated (other whitespace) is kept once: the same split, so accepted, same prompts
    domain, text = held_a[0]
    again = ROWS_A + [(domain, "  " + text.replace(" ", "\t", 2))]
    prompts, _ = evaluation_prompts(manifest, str(write_jsonl(tmp_path / "dup.jsonl", again)), None)
    assert prompts == held_a
    # the same prompt in two domains: refused by the split, naming it
    other = "high" if domain == "low" else "low"
    with pytest.raises(KnnSsdError, match=f"appears in domains '{domain}' and '{other}'"):
        evaluation_prompts(manifest, str(write_jsonl(tmp_path / "two.jsonl", ROWS_A + [(other, text)])), None)


def test_new_domains_for_the_out_of_distribution_stream_do_not_change_the_check(calibrated, tmp_path):
    """A file that only adds a domain the bundle was not calibrated on splits the bundle's domains as before."""
    _, config, table_a, folder = calibrated
    manifest = json.loads((folder / "manifest.json").read_text())
    extra = [("rag", f"t{40 + i} t41 t42 t43") for i in range(6)]
    path = str(write_jsonl(tmp_path / "ood.jsonl", extra[:3] + ROWS_A + extra[3:]))
    prompts, unseen = evaluation_prompts(manifest, path, None, ood_domains=("rag",))
    assert prompts == [(d, p) for d in domains_of(table_a) for p in prompts_of(table_a, d, HELD_OUT)]
    assert [d for d, _ in unseen] == ["rag"] * 6


def test_a_bundle_without_a_fingerprint_needs_the_override(loaded, tmp_path, capsys):
    data = write_jsonl(tmp_path / "a.jsonl", ROWS_A)
    record = calibration_record(DataConfig(path=str(data), held_out_fraction=0.34))
    del record["provenance"]
    folder = tiny_bundle(loaded, tmp_path / "bundle", calibration=record, model_id=str(tmp_path / "no-such-model"))
    assert evaluate_main(run_job(folder)) == 2
    err = capsys.readouterr().err
    assert "records no data fingerprint" in err and "--allow-unverified-data" in err and "no-such-model" not in err
    assert evaluate_main(run_job(folder, "--allow-unverified-data")) == 2  # past the check, on to the model
    err = capsys.readouterr().err
    assert "warning: the bundle records no data fingerprint" in err and "no-such-model" in err


def test_the_store_stage_is_given_calibration_prompts_only(loaded, tmp_path):
    """What pipeline/calibrate.py hands the store stage (each domain's calibration prompts of the split table),
    on a file with repeats: no held-out text (normalised) among any store's prompts, nor in the mix's union,
    and a store built from them holds one output per calibration prompt."""
    from pipeline.stores import DomainStore

    rows = ROWS_A + [("low", ROWS_A[1][1] + " "), ("high", "\t" + ROWS_A[8][1])]
    table = load_calibration_table(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)),
                                              held_out_fraction=0.34), min_calibration=PER_TRIAL)
    given = {d: prompts_of(table, d, CALIBRATION) for d in domains_of(table)}  # as run_calibration builds it
    held = {normalise_prompt(p) for d in domains_of(table) for p in prompts_of(table, d, HELD_OUT)}
    stores = {d: DomainStore(domain=d, prompts=tuple(ps), outputs=tuple(store_outputs(loaded, ps)))
              for d, ps in given.items()}
    union = DomainStore.union(stores.values(), "mix")
    for store in (*stores.values(), union):
        assert not {normalise_prompt(p) for p in store.prompts} & held
        assert len(store.arrays()) == len(store.prompts) > 0
    assert len(union.prompts) == table.num_rows - len(held) == 8
