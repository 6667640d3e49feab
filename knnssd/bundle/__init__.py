"""The routing bundle: its files, reading and verifying them, signing, routing, and the runtime that serves it.

    format.py    the folder's layout and manifest (`BundleSpec`, `Bundle`), and writing one (`write_bundle`)
    stores.py    the per-domain stores of token ids: joining, splitting, bounding and checking them
    successors.py  the per-domain warm successor tables (vocab, k): bounding, checking and writing them
    reading.py   reading a bundle folder, verified in order: signature, schema, sizes, checksums, values
    signing.py   signing a bundle and checking its signature against trusted keys (OpenSSF model-signing)
    sources.py   a bundle reference (NAME@vN, NAME@ALIAS, a folder) to a verified local folder
    routing.py   the nearest anchor of a prompt embedding, and the fallback past a distance
    runtime.py   `BundleRuntime` and `load_bundle`: a bundle on a loaded model, one drafter per domain
    reports.py   tables and charts of a bundle's calibration figures

The names below are the bundle API other packages use (`from knnssd.bundle import read_bundle`).
"""

from knnssd.bundle.format import (ANCHORS_FILE, BUNDLE_FILES, FALLBACK_KEY, MANIFEST, POLICIES_FILE,
                                  READABLE_SCHEMAS, SCHEMA_VERSION, VECTORS_FILE, Bundle, BundleSpec,
                                  is_folder_reference, manifest_digest, manifest_rows, normalise, package_version,
                                  sha256_file, write_bundle)
from knnssd.bundle.reading import (load_plain_npy, read_anchors, read_bundle, read_manifest, read_store,
                                   read_successors, store_entries, successor_entries, verify_files)
from knnssd.bundle.stores import (MAX_STORE_TOKENS, NPY_HEADER_MAX, SIZE_FIELDS, STORE_SEPARATOR, STORES_DIR,
                                  check_spec_stores, check_store, join_store, split_store, store_entry, store_files,
                                  store_sizes, union_store)
from knnssd.bundle.successors import (MAX_SUCCESSOR_VOCAB, SUCCESSORS_DIR, check_spec_successors, check_successors,
                                      successor_entry, successor_files, successor_sizes)
from knnssd.errors import BundleError

__all__ = ["ANCHORS_FILE", "BUNDLE_FILES", "Bundle", "BundleError", "BundleSpec", "FALLBACK_KEY", "MANIFEST", "MAX_STORE_TOKENS",
           "NPY_HEADER_MAX", "POLICIES_FILE", "READABLE_SCHEMAS", "SCHEMA_VERSION", "SIZE_FIELDS", "STORES_DIR",
           "STORE_SEPARATOR", "VECTORS_FILE", "check_spec_stores", "check_store", "is_folder_reference",
           "join_store", "load_plain_npy", "manifest_digest", "manifest_rows", "normalise", "package_version",
           "read_anchors", "read_bundle", "read_manifest", "read_store", "sha256_file", "split_store",
           "store_entries", "store_entry", "store_files", "store_sizes", "union_store", "verify_files",
           "write_bundle", "MAX_SUCCESSOR_VOCAB", "SUCCESSORS_DIR", "check_spec_successors", "check_successors",
           "read_successors", "successor_entries", "successor_entry", "successor_files", "successor_sizes"]
