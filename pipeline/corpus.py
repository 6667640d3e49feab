"""A user's own texts for a domain's store (`--corpus DOMAIN=PATH`, issue 29 item 4): parsed and checked here,
before any cluster work (`jobs/calibrate.py` reads them, `pipeline.calibrate.validate` checks them against the
split table); the store stage (`pipeline.store_stage`) tokenises each text in a Ray task (`corpus_entries`) and
adds it to the domain's store beside the model's own outputs, at most `MAX_CORPUS_STORE_TOKENS` tokens a domain.
Each entry's prompt key (`corpus_key`) starts with a NUL, so it never equals a calibration prompt and a trial's
leave-one-out (`DomainStore.arrays(exclude=p)`) never drops it. The bundle's calibration record notes each corpus
(`corpus_record`: file name, sha256, texts, tokens), never its text.

A corpus file is JSONL, one text a line: a JSON string, or an object with a "text" field. Blank lines are
skipped. It is bounded (`MAX_CORPUS_BYTES` per file, `MAX_CORPUS_TEXTS` texts) and must not contain a held-out
prompt of any domain (compared after whitespace normalisation, as the split compares prompts: equal to it, or
containing it where the prompt has at least `MIN_CONTAINED_CHARS` characters, shorter ones occurring by
chance): a corpus that
holds the evaluation's own prompts (a dataset with its answers, say) would let store-drafting methods look a
held-out prompt's future up.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knnssd.errors import KnnSsdError
from pipeline.data import normalise_prompt

MAX_CORPUS_BYTES = 64 * 2**20
MAX_CORPUS_TEXTS = 100_000
MIN_CONTAINED_CHARS = 32
MAX_CORPUS_STORE_TOKENS = 1_000_000  # a domain's corpus tokens; a bundle's stores hold at most 4M entries in all
CORPUS_KEY = "\x00corpus:"  # the start of a corpus entry's prompt key: no calibration prompt starts with a NUL


@dataclass(frozen=True)
class Corpus:
    """domain: the store it adds to; path: the file; texts: its texts, in file order; sha256: of the file's
    bytes as read."""

    domain: str
    path: str
    texts: tuple[str, ...]
    sha256: str

    @property
    def name(self) -> str:
        """The file's name, without its folder: what logs and the bundle's calibration record show."""
        return Path(self.path).name


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
    data = path.read_bytes()
    try:
        lines = data.decode("utf-8").splitlines()
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
    return Corpus(domain=domain, path=str(path), texts=tuple(texts), sha256=hashlib.sha256(data).hexdigest())


def load_corpora(items: list[str], domains: list[str], held_out: list[str]) -> list[Corpus]:
    """Every `--corpus DOMAIN=PATH` value read (`read_corpus`) and checked against the data (`check_corpora`)."""
    corpora = [read_corpus(*parse_corpus_flag(item)) for item in items]
    check_corpora(corpora, domains, held_out)
    return corpora


def check_corpora(corpora: list[Corpus] | tuple[Corpus, ...], domains: list[str], held_out: list[str]) -> None:
    """Each corpus's domain one of `domains` (after --merge and --domains), at most one file per domain, and no
    text that is or contains a held-out prompt (`held_out`: every domain's held-out prompt texts; see the module
    docstring)."""
    seen: set[str] = set()
    for corpus in corpora:
        if corpus.domain not in domains:
            raise KnnSsdError(f"--corpus names domain {corpus.domain!r}, which is not in the data (its domains: "
                              f"{', '.join(domains)})", fix=f"choose one of {', '.join(domains)} (after --merge "
                                                           "and --domains)")
        if corpus.domain in seen:
            raise KnnSsdError(f"--corpus names domain {corpus.domain!r} twice", fix="join its texts into one file")
        seen.add(corpus.domain)
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


def corpus_key(corpus: Corpus, number: int) -> str:
    """The store prompt key of the corpus's text `number` (1-based): never a calibration prompt (module docstring)."""
    return f"{CORPUS_KEY}{corpus.sha256[:8]}:{number}"


def load_tokenizer(name: str) -> Any:
    """The tokenizer of model `name` (a built-in name, folder or hub id, as `knnssd.engine.models.load_model`
    resolves it), without loading the weights."""
    from knnssd.cli.entry import quiet_loaders
    from knnssd.engine.models import load_tokenizer as load_model_tokenizer

    quiet_loaders()
    return load_model_tokenizer(name)


def corpus_entries(model: Any, corpus: Corpus) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """(prompt keys, token ids) of the corpus's texts as store entries: each text tokenised as plain text (no
    chat template, no special tokens) with `model`'s tokenizer (`model`: a `pipeline.tasks.ModelSpec`); a text
    of no tokens is left out. The store stage runs this as a Ray task."""
    tokenizer = load_tokenizer(model.name)
    keys, outputs = [], []
    for number, text in enumerate(corpus.texts, start=1):
        ids = tuple(int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"])
        if ids:
            keys.append(corpus_key(corpus, number))
            outputs.append(ids)
    return tuple(keys), tuple(outputs)


def check_corpus_tokens(corpus: Corpus, tokens: int, limit: int = MAX_CORPUS_STORE_TOKENS) -> None:
    """Refuse a corpus whose texts tokenise to more than `limit` tokens."""
    if tokens > limit:
        raise KnnSsdError(f"corpus {corpus.path} (domain {corpus.domain!r}) is {tokens} tokens, over the bound of "
                          f"{limit} corpus tokens per domain store",
                          fix="keep the texts most like the domain's answers (the bundle ships its stores, at most "
                              "4M tokens in all)")


def corpus_record(corpus: Corpus, store: Any) -> dict[str, Any]:
    """What the bundle's calibration record notes of a corpus, from the domain's `pipeline.stores.DomainStore`
    it was added to (the entries under its keys): file name, sha256, texts and tokens, no text."""
    prefix = corpus_key(corpus, 0)[:-1]  # the key without its text number
    outputs = [o for p, o in zip(store.prompts, store.outputs) if p.startswith(prefix)]
    return {"domain": corpus.domain, "file": corpus.name, "sha256": corpus.sha256, "texts": len(outputs),
            "tokens": sum(len(o) for o in outputs)}
