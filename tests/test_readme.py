"""The README and docs/ as a new user follows them: commands that parse, links that resolve.

Every command line in a ```bash block of README.md and docs/*.md that runs one of this project's entry points
(`knnssd ...`, `python jobs/X.py ...`, `python benchmarks/X.py ...`, also after `ray job submit ... --`) is parsed
by that entry point's own parser, so a flag renamed or removed fails here, not in a newcomer's shell. Every
relative link points to a file of the repository, and every `BENCHMARKS.md#anchor` to one of its headings. The two
commands CI runs as the README gives them (`.ci/run`) are still there, verbatim.
"""

from __future__ import annotations

import re
import shlex

import pytest

from tests.conftest import REPO_ROOT
from tests.test_help_texts import caught_parser

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
CI_COMMANDS = ("bash scripts/setup.sh && .venv/bin/python jobs/calibrate.py", ".venv/bin/python -m pytest")
ENTRY = re.compile(r"^(?:(?:DOLLAR_PWD/)?\.venv/bin/)?(?:knnssd$|python$)")


def bash_lines(page) -> list[str]:
    """The command lines of a page's ```bash blocks, continuations joined, comments dropped."""
    lines, block, pending = [], False, ""
    for raw in page.read_text().splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if not block:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # a quoted argument that goes on over the next lines
            pending = line + " "
            continue
        pending = ""
        if words:
            lines.append(line)
    return lines


def entry_argv(line: str) -> tuple[str, list[str]] | None:
    """(module:main, argv) for a line that runs one of the project's entry points, else None."""
    words = shlex.split(line.replace("$", "DOLLAR_"), comments=True)
    if "--" in words and words[:3] == ["ray", "job", "submit"]:
        words = words[words.index("--") + 1:]
    while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
        words = words[1:]
    if not words or not ENTRY.match(words[0]):
        return None
    if words[0].endswith("knnssd"):
        return "knnssd.cli:main", words[1:]
    if len(words) > 1 and words[1] != "-m" and re.match(r"^(jobs|benchmarks)/\w+\.py$", words[1]):
        return f"{words[1][:-3].replace('/', '.')}:main", words[2:]
    return None


def without_placeholders(argv: list[str]) -> list[str]:
    """`[--json]`-style optional parts of a documented command are not arguments."""
    return [word for word in argv if not (word.startswith("[") and word.endswith("]"))]


COMMANDS = [(page.name, line) for page in PAGES for line in bash_lines(page) if entry_argv(line)]


def test_pages_have_commands():
    assert len(COMMANDS) >= 20, COMMANDS


@pytest.mark.parametrize(("page", "line"), COMMANDS, ids=[f"{p}:{l[:60]}" for p, l in COMMANDS])
def test_documented_command_parses(page, line, monkeypatch):
    target, argv = entry_argv(line)
    parser = caught_parser(target, monkeypatch)
    monkeypatch.undo()
    try:
        parser.parse_args(without_placeholders(argv))
    except SystemExit as exit_:
        pytest.fail(f"{page}: `{line}` does not parse (exit {exit_.code})")


def test_ci_commands_are_in_the_readme():
    readme = bash_lines(REPO_ROOT / "README.md")
    for command in CI_COMMANDS:
        assert command in readme, command


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    anchors = {heading_anchor(line.lstrip("#")) for line in (REPO_ROOT / "BENCHMARKS.md").read_text().splitlines()
               if line.startswith("#")}
    problems = []
    for page in PAGES:
        text = page.read_text()
        targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, flags=re.M)
        for target in targets:
            if re.match(r"^[a-z]+://", target) or target.startswith("#"):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve()
            if not resolved.exists():
                problems.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.name == "BENCHMARKS.md" and anchor not in anchors:
                problems.append(f"{page.name}: {target} (no such section)")
    assert not problems, problems
