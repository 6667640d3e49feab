"""`knnssd bundles list | show | compare | alias`: reading bundles from the registry or from folders, and
pointing an alias at a version; `knnssd keys generate`: a key pair to sign bundles with.

    knnssd bundles list [NAME]
    knnssd bundles show smollm2-135m@v3 [--json] [--trusted-key release.pub]
    knnssd bundles compare smollm2-135m@v2 smollm2-135m@v3 ./path/to/bundle-folder [--json]
    knnssd bundles alias smollm2-135m@v3 production [--trusted-key release.pub]   # then serve smollm2-135m@production
    knnssd bundles alias smollm2-135m production --delete
    knnssd keys generate --out release          # release.key (private) and release.pub

A registry reference is NAME, NAME@vN, NAME@ALIAS or NAME@latest; a bundle folder is written as a path (with a
separator, or starting with "." or "~"), so a folder in the working directory never replaces a registry version.
An alias is promoted only to a version that passes the same checks as loading it: with trusted keys (--trusted-key
or $KNNSSD_TRUSTED_KEYS) its signature must verify against one, else it is refused and no alias changes; with none,
it is promoted unauthenticated, with the same warning every other entry gives.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from typing import Any

from knnssd.bundle import Bundle, is_folder_reference, manifest_rows, read_bundle
from knnssd.cli.entry import add_trusted_key_flag
from knnssd.errors import KnnSsdError
from knnssd.engine.policy import describe_policy
from knnssd.bundle.reports import format_validation
from knnssd.bundle.signing import TRUSTED_KEYS_ENV, generate_key_pair, trusted_keys
from knnssd.bundle.sources import fetch_bundle, open_registry

FIGURES = (("predicted_speedup", "predicted", 10, 3), ("speedup", "confirmed", 10, 3),
           ("mean_accepted_tokens", "mat", 6, 2), ("acceptance_rate", "accept", 8, 2), ("trials", "trials", 8, 0),
           ("mismatch_rate", "mismatch", 9, 2))
LOG = logging.getLogger("knnssd")
TRACKING_HELP = "MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."
REF_HELP = "NAME@vN, NAME@ALIAS, NAME, or a bundle folder as a path (./folder)."
# What MLflow accepts as an alias (letters, digits, '_' and '-'; at most 255), in ASCII as a reference is written.
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,254}")


def add_commands(commands: Any) -> None:
    """The `bundles` sub-commands, added to the `knnssd` parser's sub-parsers."""
    bundles = commands.add_parser("bundles", help="routing bundles in the MLflow registry or in folders.")
    bundle_commands = bundles.add_subparsers(dest="bundle_command", required=True)
    listing = bundle_commands.add_parser("list", help="registered bundles, or the versions of one.")
    listing.add_argument("name", nargs="?", help="a bundle name: list its versions.")
    listing.add_argument("--tracking-uri", help=TRACKING_HELP)
    listing.set_defaults(handler=run_list)
    show = bundle_commands.add_parser("show", help="a bundle's manifest: domains, policies, metrics.")
    show.add_argument("ref", help=REF_HELP)
    show.add_argument("--tracking-uri", help=TRACKING_HELP)
    show.add_argument("--json", action="store_true", help="print the whole manifest as JSON.")
    add_trusted_key_flag(show)
    show.set_defaults(handler=run_show)
    compare = bundle_commands.add_parser("compare", help="two or more bundles side by side, domain by domain.")
    compare.add_argument("refs", nargs="+", metavar="REF", help=REF_HELP)
    compare.add_argument("--tracking-uri", help=TRACKING_HELP)
    compare.add_argument("--json", action="store_true", help="print the comparison as one JSON object.")
    add_trusted_key_flag(compare)
    compare.set_defaults(handler=run_compare)
    alias = bundle_commands.add_parser("alias", help="point an alias such as production at a verified version "
                                                     "(serve it as NAME@production), or --delete one.")
    alias.add_argument("ref", metavar="REF", help="the version to promote: NAME@vN, NAME@ALIAS or NAME (its newest "
                                                  "version); with --delete, the bundle NAME.")
    alias.add_argument("alias", metavar="ALIAS", help="the alias, e.g. production or staging (not vN or latest, "
                                                      "which name versions already).")
    alias.add_argument("--delete", action="store_true", help="remove ALIAS from the bundle instead of setting it.")
    alias.add_argument("--tracking-uri", help=TRACKING_HELP)
    add_trusted_key_flag(alias)
    alias.set_defaults(handler=run_alias)


def add_key_commands(commands: Any) -> None:
    """`knnssd keys generate`, added to the `knnssd` parser's sub-parsers."""
    keys = commands.add_parser("keys", help="key pairs that sign bundles (knnssd/bundle/signing.py).")
    key_commands = keys.add_subparsers(dest="key_command", required=True)
    generate = key_commands.add_parser("generate", help="write a new EC P-256 key pair: PREFIX.key and PREFIX.pub.")
    generate.add_argument("--out", required=True, metavar="PREFIX",
                          help="where to write: PREFIX.key (private, mode 600; publish with --signing-key "
                               "PREFIX.key) and PREFIX.pub (give users: --trusted-key PREFIX.pub).")
    generate.set_defaults(handler=run_generate_keys)


def run_generate_keys(args: argparse.Namespace) -> int:
    private, public = generate_key_pair(args.out)
    print(f"private key {private} (keep it secret; sign with --signing-key {private})\n"
          f"public key  {public} (trust it with --trusted-key {public} or ${TRUSTED_KEYS_ENV})")
    return 0


def load(ref: str, tracking_uri: str | None, trusted: list[str] | None = None, warn: bool = True) -> Bundle:
    """The verified bundle `ref`; signed by one of the `trusted` keys (None: $KNNSSD_TRUSTED_KEYS) where any
    are configured, else loaded unauthenticated with a warning (unless `warn` is off: the caller says it)."""
    keys = trusted_keys(trusted)
    bundle = read_bundle(fetch_bundle(ref, tracking_uri, keys=keys), keys=keys)
    if warn and not bundle.authenticity.verified:
        LOG.warning("knnssd: bundle %s is %s", ref, bundle.authenticity.describe())
    return bundle


def run_list(args: argparse.Namespace) -> int:
    registry = open_registry(args.tracking_uri)
    if args.name is None:
        names = registry.names()
        print("\n".join(names) if names else f"no bundles registered in {registry.tracking_uri}")
        return 0
    print(f"{'version':<9}{'aliases':<20}{'model hash':<14}run")
    for row in registry.versions(args.name):
        print(f"v{row['version']:<8}{','.join(row['aliases']) or '-':<20}{(row['model_hash'] or '-')[:12]:<14}"
              f"{row['run_id']}")
    return 0


def figures(metrics: dict[str, Any]) -> str:
    cells = []
    for key, _, width, digits in FIGURES:
        value = metrics.get(key)
        cells.append(f"{float(value):>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}")
    return "".join(cells)


FIGURE_HEADER = "".join(f"{label:>{width}}" for _, label, width, _ in FIGURES)
STORE_WIDTH = 30


def store_cell(store: dict[str, Any] | None) -> str:
    """A store's size for tables: '8 arrays 1024 tok 4.1 KiB', or '-' without one."""
    if not store:
        return "-"
    return f"{store['arrays']} arrays {store['tokens']} tok {store['bytes'] / 1024:.1f} KiB"


def run_show(args: argparse.Namespace) -> int:
    bundle = load(args.ref, args.tracking_uri, args.trusted_key, warn=args.json)
    manifest = bundle.manifest
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"bundle {args.ref}: model {manifest['model_id']} (hash {manifest['model_hash'][:12]}), "
          f"created {manifest['created_at']}, knnssd {manifest['package_version']}")
    print(f"signature: {bundle.authenticity.describe()}")
    print(f"fallback beyond cosine distance {manifest['routing']['fallback_distance']:.4f}: "
          f"{describe_policy(manifest['fallback_policy'])}")
    print(f"\n{'domain':<16}{'anchors':>8}{FIGURE_HEADER}  {'store':<{STORE_WIDTH}}policy")
    for name, row in manifest_rows(manifest).items():
        print(f"{name:<16}{row['anchors']:>8}{figures(row['metrics'])}  {store_cell(row['store']):<{STORE_WIDTH}}"
              f"{describe_policy(row['policy'])}")
    if manifest.get("reference_policies"):
        print("(rows in parentheses: reference policies searched for comparison, never routed to; their store is "
              "the union of every domain's)")
    print("predicted: the search's replayed, priced speedup; confirmed: wall clock over plain decoding, on more "
          "prompts; mat (mean accepted tokens per step), accept (acceptance rate), mismatch (share of prompts whose "
          "tokens differed from plain decoding): from the confirmation; store: the domain's own greedy outputs that "
          "a suffix_tree +store policy drafts from (arrays, token ids, file size)")
    validation = manifest.get("calibration", {}).get("validation")
    if validation and validation.get("domains"):
        print("\n" + format_validation(validation))
    return 0


def comparison(refs: list[str], tracking_uri: str | None, trusted: list[str] | None = None) -> dict[str, Any]:
    """Per bundle: its identity and provenance; per domain: each bundle's policy and figures (None where a
    bundle lacks the domain)."""
    if len(refs) < 2:
        raise KnnSsdError("compare needs at least two bundles", fix="name two or more, e.g. NAME@v1 NAME@v2")
    manifests = {ref: load(ref, tracking_uri, trusted).manifest for ref in refs}
    bundles = [{"ref": ref, "model_id": m["model_id"], "model_hash": m["model_hash"], "created_at": m["created_at"],
                "domains": [d["name"] for d in m["domains"]], "provenance": m.get("calibration", {}).get("provenance", {}),
                "trials_per_domain": m.get("calibration", {}).get("search", {}).get("trials"),
                "held_out": m.get("calibration", {}).get("validation")}
               for ref, m in manifests.items()]
    rows = {ref: manifest_rows(m) for ref, m in manifests.items()}
    names = list(dict.fromkeys(name for table in rows.values() for name in table))
    names.sort(key=lambda name: name.startswith("("))  # routed domains first, reference policies last
    domains = {name: {ref: None if name not in rows[ref] else {
        "policy": rows[ref][name]["policy"], "description": describe_policy(rows[ref][name]["policy"]),
        "anchors": rows[ref][name]["anchors"], "metrics": rows[ref][name]["metrics"]} for ref in refs} for name in names}
    return {"bundles": bundles, "domains": domains}


def run_compare(args: argparse.Namespace) -> int:
    result = comparison(args.refs, args.tracking_uri, args.trusted_key)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    width = max(12, *(len(ref) + 2 for ref in args.refs))
    for bundle in result["bundles"]:
        fingerprint = bundle["provenance"].get("data.fingerprint", "-")
        print(f"{bundle['ref']}: model {bundle['model_id']} ({bundle['model_hash'][:12]}), created "
              f"{bundle['created_at']}, {bundle['trials_per_domain'] or '-'} trials per domain, data {fingerprint}")
    for name, cells in result["domains"].items():
        print(f"\n{name}")
        print(f"  {'bundle':<{width}}{FIGURE_HEADER}  policy")
        for ref, cell in cells.items():
            if cell is None:
                print(f"  {ref:<{width}}  (no such domain)")
            else:
                print(f"  {ref:<{width}}{figures(cell['metrics'])}  {cell['description']}")
    print("\npredicted / confirmed: each policy's searched and wall-clock speedups; mat (mean accepted tokens per "
          "step), accept (acceptance rate), mismatch: from the confirmation")
    return 0


def check_alias_name(alias: str) -> str:
    """`alias` when it can name an alias: not a version selector (vN, latest), and MLflow's characters."""
    if re.fullmatch(r"[vV]\d+", alias) or alias.lower() == "latest":
        meaning = "the newest version" if alias.lower() == "latest" else f"version {alias[1:]}"
        raise KnnSsdError(f"alias {alias!r} reads as a version: NAME@{alias} already means {meaning}",
                          fix="choose a word for the alias, e.g. production or staging")
    if not ALIAS_PATTERN.fullmatch(alias):
        raise KnnSsdError(f"alias {alias!r} is not a valid alias name",
                          fix="use letters, digits, '_' and '-', starting with a letter or digit (at most 255)")
    return alias


def run_alias(args: argparse.Namespace) -> int:
    alias = check_alias_name(args.alias)
    if is_folder_reference(args.ref):
        raise KnnSsdError(f"{args.ref!r} is a bundle folder; only registry versions carry aliases",
                          fix="publish it first (jobs/calibrate.py, or BundleRegistry.publish), then alias NAME@vN")
    registry = open_registry(args.tracking_uri)
    if args.delete:
        name, version = registry.resolve(args.ref) if "@" in args.ref else (args.ref.strip(), None)
        was = registry.delete_alias(name, alias, version)
        print(f"deleted alias {alias} (was -> {name} v{was})")
        return 0
    name, version = registry.resolve(args.ref)
    bundle = load(f"{name}@v{version}", args.tracking_uri, args.trusted_key)  # refused unless it verifies
    previous = next((row["version"] for row in registry.versions(name) if alias in row["aliases"]), None)
    registry.set_alias(name, alias, version)
    moved = "" if previous in (None, version) else f" (was v{previous})"
    print(f"alias {alias} -> {name} v{version}{moved}\nsignature: {bundle.authenticity.describe()}")
    return 0
