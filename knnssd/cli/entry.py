"""What every command-line entry shares (`knnssd`, jobs/calibrate.py, jobs/evaluate.py, jobs/demo.py):

- bad input, raised anywhere as `KnnSsdError`, prints one line `error: <problem> (fix: <what to do>)` on stderr
  and exits 2; Ctrl-C exits 130; anything else is a bug and keeps its traceback;
- knnssd's own progress messages (model conversion) go to stderr; third-party loader chatter does not
  (FAISS's "Could not load library with AVX2 support", MLflow's "Creating initial MLflow database tables",
  transformers' per-tensor loading bars);
- `ArgumentParser`: every flag's default in its help, and a bad flag as one `error: ... (fix: ...)` line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, NoReturn

from knnssd.errors import KnnSsdError

QUIET_LOGGERS = ("faiss", "mlflow", "alembic")



def add_trusted_key_flag(parser: argparse.ArgumentParser) -> None:
    """--trusted-key PATH, repeatable: the same on every command that reads bundles (no torch needed here)."""
    from knnssd.bundle.signing import TRUSTED_KEYS_ENV

    parser.add_argument("--trusted-key", action="append", metavar="PATH", default=None,
                        help=f"a public key (PEM) the bundle must be signed by; repeat for several (default: "
                             f"${TRUSTED_KEYS_ENV}, paths separated by '{os.pathsep}'; none: the bundle is "
                             f"unauthenticated).")

def quiet_loaders() -> None:
    """knnssd's INFO messages on stderr; FAISS's loader, MLflow's store set-up and transformers' progress bars
    silenced (warnings still show)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported, here or in workers
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars on stderr
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("knnssd").setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return
    hf_logging.disable_progress_bar()


def run_main(body: Callable[[], int | None]) -> int:
    """Run a command's `body` under the shared error handling; returns the exit code."""
    quiet_loaders()
    try:
        return body() or 0
    except KnnSsdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Each flag's default printed once: "(default: X)" goes before the help's final period, unless the help
    already says what its default is, or the default says nothing (None, False: the flag is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text.lower() or action.default in (None, False)
                or action.default is argparse.SUPPRESS):
            return text
        return text.removesuffix(".") + " (default: %(default)s)" + ("." if text.endswith(".") else "")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every flag's default in its help, once (`DefaultsOnceFormatter`), and a bad flag reported
    like any bad input: one line `error: ... (fix: ...)`, exit 2 (argparse's own form is a usage block and
    "prog: error: ...")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsOnceFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (fix: see {self.prog} --help for the flags and their defaults)", file=sys.stderr)
        sys.exit(2)


def add_engine_flags(parser: argparse.ArgumentParser, who: str) -> None:
    """--threads and --no-fast-kernels, the same on every entry; `who` says what decodes ("every trial", ...)."""
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch threads {who} decodes with (default: $KNNSSD_THREADS, else every core).")
    parser.add_argument("--no-fast-kernels", action="store_true",
                        help="keep transformers' own linear layers in verify passes (knnssd/engine/kernels.py), to compare.")
