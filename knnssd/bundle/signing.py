"""Signed bundles: who vouches for a bundle, checked before anything in it is read.

A bundle folder is signed with OpenSSF's `model-signing` (the elliptic-curve key mode: offline, no Sigstore, no
network). The signature, `bundle.sig` in the folder (a Sigstore bundle holding an in-toto statement), covers
every other file of the folder by sha256, and a verification also refuses a file the signature does not name.
No cryptography is written here: keys are made with `cryptography`, signing and verification are
`model_signing`'s.

    knnssd keys generate --out release            # release.key (private, mode 600) and release.pub
    jobs/calibrate.py ... --signing-key release.key
    knnssd bundles show NAME@production --trusted-key release.pub
    KNNSSD_TRUSTED_KEYS=release.pub:old.pub python serve.py   # os.pathsep between paths

Trusted keys come from the caller (`--trusted-key`, `load_bundle(trusted_keys=...)`), else from
$KNNSSD_TRUSTED_KEYS. With at least one, a bundle must carry a signature that verifies against one of them:
an unsigned bundle, one signed by another key, or one whose files differ from what was signed is refused. With
none, nothing is verified and the bundle is reported as unauthenticated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from knnssd.errors import KnnSsdError

LOG = logging.getLogger("knnssd")
SIGNATURE_FILE = "bundle.sig"
TRUSTED_KEYS_ENV = "KNNSSD_TRUSTED_KEYS"
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model-signing's key mode accepts
KEY_HELP = "a PEM public key (EC P-256/384/521) made by `knnssd keys generate`"
PathLike = str | os.PathLike[str]


class SignatureError(KnnSsdError):
    """A bundle that is not vouched for by a trusted key, or a key that cannot be used."""


@dataclass(frozen=True)
class Authenticity:
    """What the signature check found: `key` is the trusted public key the signature verified against (None: no
    trusted key was configured, so nothing was verified); `signed`: whether the folder carries a signature."""

    key: str | None = None
    signed: bool = False

    @property
    def verified(self) -> bool:
        return self.key is not None

    def describe(self) -> str:
        if self.verified:
            return f"signature verified with trusted key {self.key}"
        carried = "it carries a signature that was not checked" if self.signed else "it is unsigned"
        return (f"unauthenticated: no trusted key configured (--trusted-key or ${TRUSTED_KEYS_ENV}), so nothing "
                f"vouches for who made this bundle; {carried}")


def trusted_keys(explicit: Sequence[PathLike] | None = None) -> tuple[Path, ...]:
    """The public keys to trust: `explicit` when given (even empty: then none), else $KNNSSD_TRUSTED_KEYS (paths
    separated by os.pathsep). Each must be a readable PEM public key of a supported curve."""
    if explicit is None:
        explicit = [part for part in os.environ.get(TRUSTED_KEYS_ENV, "").split(os.pathsep) if part.strip()]
    keys = tuple(Path(key).expanduser() for key in explicit)
    for key in keys:
        _load_public_key(key)
    return keys


def key_contents(explicit: Sequence[PathLike] | None = None) -> list[str]:
    """The trusted keys (`trusted_keys(explicit)`: the given paths, else $KNNSSD_TRUSTED_KEYS here) as PEM text,
    to send to another process: a Ray worker or replica on another node has neither this process's environment
    nor its key files, and must not load a bundle unauthenticated because of that."""
    return [path.read_text() for path in trusted_keys(explicit)]


@contextlib.contextmanager
def keys_from_contents(pems: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """In the receiving process: `pems` (from `key_contents`) written to files of its own for the block, as
    `trusted_keys` for `load_bundle` (an empty tuple: the sender trusted none, so nothing is read from here)."""
    with tempfile.TemporaryDirectory(prefix="knnssd-trusted-") as folder:
        paths = [Path(folder) / f"trusted-{i}.pub" for i in range(len(pems))]
        for path, pem in zip(paths, pems):
            path.write_text(pem)
        yield tuple(str(path) for path in paths)


def _load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.is_file():
        raise SignatureError(f"trusted key {path} does not exist",
                             fix=f"pass {KEY_HELP}, or fix the path in --trusted-key / ${TRUSTED_KEYS_ENV}")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError, OSError) as exc:
        raise SignatureError(f"trusted key {path} is not a PEM public key ({type(exc).__name__})",
                             fix=f"pass {KEY_HELP} (the .pub file, never the private .key)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SUPPORTED_CURVES:
        raise SignatureError(f"trusted key {path} is not an EC P-256/384/521 key, which model-signing needs",
                             fix=f"pass {KEY_HELP}")
    return key


def generate_key_pair(prefix: PathLike) -> tuple[Path, Path]:
    """Write a new EC P-256 key pair: PREFIX.key (PKCS#8 PEM, unencrypted, mode 600) and PREFIX.pub (PEM);
    refuses to overwrite either. Returns (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = Path(f"{prefix}.key").expanduser(), Path(f"{prefix}.pub").expanduser()
    for path in (private, public):
        if path.exists():
            raise SignatureError(f"{path} already exists", fix="choose another --out prefix; keys are never overwritten")
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public




def check_signing_key(private_key: PathLike) -> Path:
    """`private_key` as a Path, once it is known to be an unencrypted PEM private key of a curve model-signing
    signs with (checked before any work, so a typo fails at once, not after a calibration)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(private_key).expanduser()
    if not path.is_file():
        raise SignatureError(f"signing key {path} does not exist",
                             fix="pass the private key file made by `knnssd keys generate --out PREFIX` (PREFIX.key)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"signing key {path} is not an unencrypted PEM private key ({type(exc).__name__})",
                             fix="pass PREFIX.key made by `knnssd keys generate` (not the .pub file)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in SUPPORTED_CURVES:
        raise SignatureError(f"signing key {path} is not an EC P-256/384/521 key, which model-signing needs",
                             fix="make one with `knnssd keys generate --out PREFIX`")
    return path


def signed_files():
    """model-signing's hashing config for a bundle: every file but the signature, `.git*` files included (its
    default leaves them out, so a file added under such a name would not be refused)."""
    import model_signing

    return model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)


def sign_bundle(folder: PathLike, private_key: PathLike) -> Path:
    """Sign every file of the bundle folder (any earlier signature is replaced); returns the signature path."""
    import model_signing

    folder, private_key = Path(folder), check_signing_key(private_key)
    signature = folder / SIGNATURE_FILE
    signature.unlink(missing_ok=True)
    config = model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key)
    config.set_hashing_config(signed_files())
    config.sign(folder, signature)
    return signature


def verify_signature(folder: PathLike, keys: Sequence[Path]) -> Authenticity:
    """Check the folder's signature against `keys` (from `trusted_keys`), reading nothing else of the bundle
    first. With no keys: nothing is checked (unauthenticated). Raises SignatureError when keys are configured and
    the folder is unsigned, signed by none of them, or holds files other than those signed."""
    folder = Path(folder)
    signature = folder / SIGNATURE_FILE
    if not keys:
        return Authenticity(key=None, signed=signature.is_file())
    shown = ", ".join(str(key) for key in keys)
    if not signature.is_file():
        raise SignatureError(f"bundle {folder} is unsigned, and trusted keys are configured ({shown}): refused",
                             fix="publish it again with --signing-key (the private key of a trusted public key), "
                                 "or trust no key to accept unauthenticated bundles")
    import model_signing

    failures = []
    for key in keys:
        config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=key)
        config.set_hashing_config(signed_files())
        try:
            with contextlib.redirect_stdout(sys.stderr):  # model-signing prints warnings on stdout
                config.verify(folder, signature)
            return Authenticity(key=str(key), signed=True)
        except Exception as exc:  # noqa: BLE001 - whatever fails, the bundle is not vouched for by this key
            failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
    if any("Signature mismatch" in failure for failure in failures):
        what = "its files differ from the ones its signature covers (changed, added or removed after signing)"
    elif all("Key mismatch" in failure or "InvalidSignature" in failure for failure in failures):
        what = "it is signed by a key that is not among the trusted ones"
    else:
        what = f"its signature {SIGNATURE_FILE} is damaged or not a model-signing signature ({failures[0]})"
    raise SignatureError(f"bundle {folder} is refused: {what} (trusted keys: {shown})",
                         fix="use a bundle published with --signing-key by a key you trust; never edit a bundle "
                             "in place")
