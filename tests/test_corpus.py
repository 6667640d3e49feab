"""`--corpus DOMAIN=PATH` parsing and checks (pipeline/corpus.py); its wiring into calibration is
tests/test_corpus_wiring.py's."""

from __future__ import annotations

import hashlib
import json

import pytest

from knnssd.errors import KnnSsdError
from pipeline.corpus import Corpus, load_corpora, parse_corpus_flag, read_corpus

HELD_OUT = ["Summarise the following article about the history of the printing press in Europe.", "Hi"]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_corpus_is_read_as_strings_or_text_objects(tmp_path):
    path = write(tmp_path / "c.jsonl", [json.dumps("first text"), "", json.dumps({"text": "second", "id": 3})])
    (corpus,) = load_corpora([f"qa={path}"], ["qa", "chat"], HELD_OUT)
    assert corpus == Corpus(domain="qa", path=str(path), texts=("first text", "second"),
                            sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    assert corpus.name == "c.jsonl"
    assert parse_corpus_flag(" qa = ~/x.jsonl")[0] == "qa"
    # a held-out prompt shorter than the containment bound only counts when the whole text equals it
    assert load_corpora([f"qa={write(tmp_path / 'h.jsonl', [json.dumps('Hi there, how are you')])}"], ["qa"],
                        HELD_OUT)[0].texts == ("Hi there, how are you",)


@pytest.mark.parametrize("setup, words", [
    ("no-equals", "is not DOMAIN=PATH"),
    ("missing", "does not exist"),
    ("unknown-domain", "domain 'code', which is not in the data \\(its domains: qa, chat\\)"),
    ("twice", "names domain 'qa' twice"),
    ("not-json", "line 2 is not JSON"),
    ("number", "line 1 is neither a JSON string nor an object"),
    ("empty", "holds no texts"),
    ("not-utf8", "is not UTF-8 text"),
    ("held-out", "text 2 contains the held-out prompt 'Summarise the following"),
    ("held-out-exact", "text 1 contains the held-out prompt 'Hi'"),
])
def test_bad_corpora_are_clear_errors(tmp_path, setup, words):
    good = write(tmp_path / "good.jsonl", [json.dumps("a text")])
    items = {"no-equals": [str(good)], "missing": [f"qa={tmp_path / 'none.jsonl'}"],
             "unknown-domain": [f"code={good}"], "twice": [f"qa={good}", f"qa={good}"]}.get(setup)
    if items is None:
        bad = tmp_path / "bad.jsonl"
        if setup == "not-utf8":
            bad.write_bytes(b'"caf\xe9"\n')
        else:
            write(bad, {"not-json": [json.dumps("ok"), "{oops"], "number": ["3"], "empty": ["", json.dumps("  ")],
                        "held-out": [json.dumps("x"), json.dumps("Answer:  Summarise the following article about the "
                                                                 "history\nof the printing press in Europe. It...")],
                        "held-out-exact": [json.dumps(" Hi ")]}[setup])
        items = [f"qa={bad}"]
    with pytest.raises(KnnSsdError, match=words) as error:
        load_corpora(items, ["qa", "chat"], HELD_OUT)
    assert error.value.fix


def test_size_bounds(tmp_path):
    path = write(tmp_path / "c.jsonl", [json.dumps(f"text {i}") for i in range(5)])
    with pytest.raises(KnnSsdError, match="over the bound of 4"):
        read_corpus("qa", path, max_texts=4)
    with pytest.raises(KnnSsdError, match="MiB bound"):
        read_corpus("qa", path, max_bytes=10)
