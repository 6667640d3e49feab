"""What a new user reads first: `--help` of every entry point, discovered, not listed.

Entry points are every `jobs/*.py` with a `main` and every console script in pyproject.toml. Each one's parser is
caught where `main` parses its arguments, and walked down every subcommand, so a command or flag added later is
checked too. Each parser's description is a sentence (a capital first letter, a final period); each flag's help
as `--help` prints it ends a sentence, with balanced brackets, and says "default" at most once.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import tomllib

import pytest

from tests.conftest import REPO_ROOT

SENTENCE_END = (".", "?", "!")


class Caught(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def entry_points() -> dict[str, str]:
    """{name: "module:function"}: the jobs and the console scripts."""
    found = {f"jobs/{path.name}": f"jobs.{path.stem}:main" for path in sorted((REPO_ROOT / "jobs").glob("*.py"))
             if re.search(r"^def main\(", path.read_text(), flags=re.M)}
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})
    found.update(scripts)
    return found


def caught_parser(target: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser `target`'s main parses its arguments with, caught before it parses anything."""
    module, function = target.split(":")

    def catch(self, *args, **kwargs):
        raise Caught(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    monkeypatch.setattr(sys, "argv", [target, "--help"])
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(Caught) as caught:
        main()
    return caught.value.parser


def walk(parser: argparse.ArgumentParser):
    """The parser and every subcommand's parser below it, with the help each subcommand is listed with."""
    yield parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                for inner, listing in walk(sub):
                    yield inner, listing if inner is not sub else listed.get(name)


def is_sentence(text: str | None) -> bool:
    return bool(text) and text.strip().endswith(SENTENCE_END) and balanced(text)


def balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def problems(parser: argparse.ArgumentParser, listing: str | None) -> list[str]:
    found = []
    description = " ".join((parser.description or "").split())
    if listing is not None and not description:
        pass  # a subcommand without a description: the help it is listed with says what it does
    elif not (description[:1].isupper() and is_sentence(description)):
        found.append(f"{parser.prog}: description is not a sentence: {description!r}")
    if listing is not None and not is_sentence(listing):
        found.append(f"{parser.prog}: listed with help that is not a sentence: {listing!r}")
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        shown = " ".join(formatter._expand_help(action).split()) if action.help else ""
        if not is_sentence(shown):
            found.append(f"{parser.prog} {name}: help ends mid-sentence: {shown!r}")
        if len(re.findall(r"\bdefault", shown, flags=re.I)) > 1:
            found.append(f"{parser.prog} {name}: default printed twice: {shown!r}")
    return found


ENTRY_POINTS = entry_points()


def test_every_job_and_console_script_is_discovered():
    assert {"jobs/calibrate.py", "jobs/evaluate.py", "jobs/demo.py", "knnssd"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_texts_are_sentences_with_each_default_once(name, monkeypatch):
    parser = caught_parser(ENTRY_POINTS[name], monkeypatch)
    parsers = list(walk(parser))
    if name == "knnssd":
        assert len(parsers) > 3  # the subcommands were walked
    found = [problem for sub, listing in parsers for problem in problems(sub, listing)]
    assert not found, "\n".join(found)


def test_the_checks_catch_what_they_are_for():
    """A description cut mid-sentence, a help without an end, and a default said twice are each reported."""
    from knnssd.cli.entry import ArgumentParser

    parser = ArgumentParser(prog="x", description="The study of a bundle: KNN-SSD against an oracle, plain")
    parser.add_argument("--fix", default=None, help="domains to fix (default all) (default: None).")
    parser.add_argument("--count", type=int, default=3, help="how many (default: 4).")
    parser.add_argument("--tail", default="a", help="a help with no end")
    found = "\n".join(problems(parser, None))
    assert "description is not a sentence" in found and "--fix: default printed twice" in found
    assert "--tail: help ends mid-sentence" in found and "--count" not in found  # its default is said once
