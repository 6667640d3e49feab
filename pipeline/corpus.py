"""A user's own texts for a domain's store (`--corpus DOMAIN=PATH`, issue 29 item 4): parsed and checked here,
before any cluster work. Not wired into calibration yet: the store stage (`pipeline.store_stage`) would tokenise
each text and add it to the domain's store beside the model's own outputs.

A corpus file is JSONL, one text a line: a JSON string, or an object with a "text" field. Blank lines are
skipped. It is bounded (`MAX_CORPUS_BYTES` per file, `MAX_CORPUS_TEXTS` texts) and must not contain a held-out
prompt of any domain (compared after whitespace normalisation, as the split compares prompts: equal to it, or
containing it where the prompt has at least `MIN_CONTAINED_CHARS` characters, shorter ones occurring by
chance): a corpus that
holds the evaluation's own prompts (a dataset with its answers, say) would let store-drafting methods look a
held-out prompt's future up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from knnssd.errors import KnnSsdError
from pipeline.data import normalise_prompt

MAX_CORPUS_BYTES = 64 * 2**20
MAX_CORPUS_TEXTS = 100_000
MIN_CONTAINED_CHARS = 32


@dataclass(frozen=True)
class Corpus:
    """domain: the store it adds to; path: the file; texts: its texts, in file order."""

    domain: str
    path: str
    texts: tuple[str, ...]


def parse_corpus_flag(item: str) -> tuple[str, Path]:
    """(domain, path) of one `--corpus DOMAIN=PATH` value."""
    domain, sep, path = item.partition("=")
    if not sep or not domain.strip() or not path.strip():
        raise KnnSsdError(f"--corpus {item!r} is not DOMAIN=PATH",
                          fix="write e.g. --corpus qa=my_answers.jsonl (a JSONL file, one text a line)")
    return domain.strip(), Path(path.strip()).expanduser()


def read_corpus(domain: str, path: Path, max_bytes: int = MAX_CORPUS_BYTES,
                max_texts: int = MAX_CORPUS_TEXTS) -> Corpus:
    """The texts of one corpus file, checked: it exists, is within `max_bytes`, every line is a JSON string or
    an object with a string "text", at least one text and at most `max_texts`."""
    if not path.is_file():
        raise KnnSsdError(f"corpus file {path} (for domain {domain!r}) does not exist",
                          fix="pass --corpus DOMAIN=PATH of a JSONL file, one text a line")
    size = path.stat().st_size
    if size > max_bytes:
        raise KnnSsdError(f"corpus file {path} is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB bound",
                          fix="keep the texts most like the domain's prompts' answers, or split them by domain")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise KnnSsdError(f"corpus file {path} is not UTF-8 text (byte {exc.start})",
                          fix="save it as UTF-8 JSONL, one text a line") from None
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KnnSsdError(f"{path} line {number} is not JSON ({exc.msg})",
                              fix='write one text a line as a JSON string, e.g. "some text", or {"text": "..."}') from None
        text = record.get("text") if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise KnnSsdError(f"{path} line {number} is neither a JSON string nor an object with a string \"text\"",
                              fix='write one text a line as a JSON string, e.g. "some text", or {"text": "..."}')
        if text.strip():
            texts.append(text)
    if not texts:
        raise KnnSsdError(f"corpus file {path} holds no texts", fix="give a JSONL file with one text a line")
    if len(texts) > max_texts:
        raise KnnSsdError(f"corpus file {path} holds {len(texts)} texts, over the bound of {max_texts}",
                          fix="keep fewer texts, e.g. those most like the domain's answers")
    return Corpus(domain=domain, path=str(path), texts=tuple(texts))


def load_corpora(items: list[str], domains: list[str], held_out: list[str]) -> list[Corpus]:
    """Every `--corpus DOMAIN=PATH` value read and checked against the data: each domain one of `domains`
    (after --merge), at most one file per domain, and no text that is or contains a held-out prompt
    (`held_out`: every domain's held-out prompt texts; see the module docstring)."""
    corpora: list[Corpus] = []
    for item in items:
        domain, path = parse_corpus_flag(item)
        if domain not in domains:
            raise KnnSsdError(f"--corpus names domain {domain!r}, which is not in the data",
                              fix=f"choose from {', '.join(domains)}")
        if any(c.domain == domain for c in corpora):
            raise KnnSsdError(f"--corpus names domain {domain!r} twice", fix="join its texts into one file")
        corpora.append(read_corpus(domain, path))
    prompts = [(normalise_prompt(p), p) for p in held_out if p.strip()]
    for corpus in corpora:
        for number, text in enumerate(corpus.texts, start=1):
            flat = normalise_prompt(text)
            hit = next((p for key, p in prompts
                        if key == flat or (len(key) >= MIN_CONTAINED_CHARS and key in flat)), None)
            if hit is not None:
                shown = hit if len(hit) <= 80 else hit[:77] + "..."
                raise KnnSsdError(f"corpus {corpus.path} text {number} contains the held-out prompt {shown!r}",
                                  fix="remove the evaluation's prompts (and their answers) from the corpus: "
                                      "drafting from them would look a held-out prompt's future up")
    return corpora
