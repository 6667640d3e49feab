"""The `knnssd` command line.

    commands.py  the parser and `main` (the `knnssd` console script; `python -m knnssd.cli`)
    entry.py     what every command-line entry shares: error lines, exit codes, the common flags
    generate.py  `knnssd generate`
    bundles.py   `knnssd bundles list | show | compare` and `knnssd keys generate`
    serve.py     `knnssd serve`

`main` is imported lazily, so `knnssd.cli.entry` (which jobs/ use) stays as light as it is.
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The `knnssd` command line (`knnssd.cli.commands.main`)."""
    from knnssd.cli.commands import main as run

    return run(argv)
