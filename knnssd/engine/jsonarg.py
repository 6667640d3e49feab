"""Command-line values that are JSON, given inline or as the path of a JSON file (`--skip-set`, `--policy`)."""

from __future__ import annotations

from pathlib import Path

from knnssd.errors import KnnSsdError


def json_source(value: str, flag: str, example: str) -> str:
    """The JSON text of `value`: itself when it starts with "{", else the contents of the file it names.

    Raises a KnnSsdError naming `flag` and showing `example` when it is neither."""
    if value.strip().startswith("{"):
        return value.strip()
    path = Path(value)
    if not path.is_file():
        raise KnnSsdError(f"{flag} {value!r} is neither inline JSON nor an existing file",
                          fix=f"pass JSON such as '{example}' or a path to a .json file")
    return path.read_text()
