"""Where knnssd keeps converted models, model hashes and downloaded bundles.

`KNNSSD_CACHE` overrides the default ``~/.cache/knnssd``. Writes into the cache
are atomic: a file or folder appears under its final name only when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: `override`, else $KNNSSD_CACHE, else ~/.cache/knnssd (created)."""
    root = Path(override or os.environ.get("KNNSSD_CACHE") or Path.home() / ".cache" / "knnssd")
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_json_atomic(path: Path, data: object) -> None:
    """Write `data` as JSON to `path` so readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
