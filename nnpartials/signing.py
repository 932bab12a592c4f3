"""Signed bundles: OpenSSF model-signing with elliptic-curve keys (offline, no Sigstore account).

A signed bundle holds ``model.sig`` (a Sigstore-format bundle written by the ``model-signing`` library) whose
payload lists the sha256 of ``manifest.json`` and of every file the manifest lists. The manifest itself lists
the sha256 of every file, so a signature over it pins the whole bundle; changing a weight and re-hashing the
manifest still breaks the signature. ``model.sig`` is not listed in the manifest (it signs the manifest).

Both signing and verification work on the bytes the loader has already read and hash-checked (staged in a
private temporary folder), never on a second read of the bundle folder, so a file swapped between the two
reads cannot slip past. The signature is also verifiable with the library's own command line on the folder::

    model_signing verify key BUNDLE --signature BUNDLE/model.sig --public_key PUB.pem

Keys: PEM elliptic-curve keys on P-256, P-384 or P-521 (for example
``openssl ecparam -name prime256v1 -genkey -noout -out key.pem`` and ``openssl ec -in key.pem -pubout -out pub.pem``).
The private key must not be password-protected for ``export(..., sign=KEY)``; :func:`sign_bundle` takes a
``password``. Needs the ``sign`` extra: ``pip install 'nnpartials[sign]'``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from nnpartials.errors import BundleError, ExportError
from nnpartials.files import _read_regular, _write_file

#: The signature's file name in a bundle (not listed in the manifest: it signs the manifest).
SIGNATURE = "model.sig"

INSTALL_HINT = "pip install 'nnpartials[sign]'"
#: Largest key file read (a PEM EC key is a few hundred bytes).
MAX_KEY_BYTES = 64 * 1024
#: Curves model-signing accepts for elliptic-curve keys.
CURVES = ("secp256r1", "secp384r1", "secp521r1")


def _library(error):
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as exc:
        raise error(f"signed bundles need the model-signing package ({exc}); install it with {INSTALL_HINT}") from None
    return hashing, signing, verifying


def _hashing_config(hashing):
    # Every file by its sha256, no symbolic links, the signature itself left out; nothing else ignored.
    return hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False) \
        .set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def _read_key(path, error, what) -> bytes:
    if path is None or not isinstance(path, (str, os.PathLike)):
        raise error(f"{what}: expected the path of a PEM key file, got {type(path).__name__}")
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    try:
        return _read_regular(folder, name, MAX_KEY_BYTES, f"{what} {path!r} does not exist")
    except BundleError as exc:
        msg = str(exc)
        raise error(msg if msg.startswith(what) else f"{what}: {msg}") from None


def _check_curve(key, path, error, what):
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        raise error(f"{what} {os.fspath(path)!r}: expected an elliptic-curve key ({', '.join(CURVES)}), found "
                    f"{type(key).__name__.lstrip('_')}")
    if key.curve.name not in CURVES:
        raise error(f"{what} {os.fspath(path)!r}: expected a key on {', '.join(CURVES)}, found {key.curve.name}")


def check_private_key(private_key, password: str | None = None) -> None:
    """Raise :class:`ExportError` unless ``private_key`` names a usable PEM elliptic-curve private key (and the
    model-signing library is installed). ``export(..., sign=KEY)`` calls this before any work."""
    _library(ExportError)
    from cryptography.hazmat.primitives import serialization

    data = _read_key(private_key, ExportError, "private key")
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password is not None else None)
    except TypeError as exc:  # password missing, or given for an unencrypted key
        raise ExportError(f"private key {os.fspath(private_key)!r}: {exc}") from None
    except ValueError as exc:
        raise ExportError(f"private key {os.fspath(private_key)!r}: not a PEM private key, or a wrong password "
                          f"({exc})") from None
    _check_curve(key, private_key, ExportError, "private key")


@contextlib.contextmanager
def _staged(files: dict):
    """A private temporary folder: ``bundle/`` holding exactly ``files`` (name -> bytes); yields (that folder, the
    temporary folder around it)."""
    with tempfile.TemporaryDirectory(prefix="nnp-sign-") as tmp:
        folder = os.path.join(tmp, "bundle")
        os.mkdir(folder, 0o700)
        for name, data in files.items():
            _write_file(folder, name, data)
        yield folder, tmp


def signature_for(files: dict, private_key, password: str | None = None) -> bytes:
    """The signature (contents of ``model.sig``) over ``files`` (name -> bytes: manifest.json and every listed
    file)."""
    hashing, signing, _ = _library(ExportError)
    check_private_key(private_key, password)
    with _staged(files) as (folder, tmp):
        sig_path = os.path.join(tmp, SIGNATURE)
        try:
            signing.Config().use_elliptic_key_signer(private_key=os.fspath(private_key), password=password) \
                .set_hashing_config(_hashing_config(hashing)).sign(folder, sig_path)
        except Exception as exc:
            raise ExportError(f"signing failed: {type(exc).__name__}: {exc}") from None
        with open(sig_path, "rb") as f:
            return f.read()


def check_signature(files: dict, signature: bytes, public_key, where="bundle") -> None:
    """Raise :class:`BundleError` unless ``signature`` (bytes of ``model.sig``) is a valid signature by the private
    key of ``public_key`` (path of a PEM public key) over exactly ``files`` (name -> bytes: manifest.json and every
    file it lists). Used by :func:`~nnpartials.bundle.load_bundle` when given a key."""
    hashing, _, verifying = _library(BundleError)
    from cryptography.hazmat.primitives import serialization

    data = _read_key(public_key, BundleError, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise BundleError(f"public key {os.fspath(public_key)!r}: not a PEM public key ({exc})") from None
    _check_curve(key, public_key, BundleError, "public key")
    with _staged(files) as (folder, tmp):
        _write_file(tmp, "public_key.pem", data)  # the key bytes checked above
        _write_file(tmp, SIGNATURE, signature)
        key_path, sig_path = os.path.join(tmp, "public_key.pem"), os.path.join(tmp, SIGNATURE)
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=key_path) \
                .set_hashing_config(_hashing_config(hashing)).verify(folder, sig_path)
        except Exception as exc:
            raise BundleError(f"{where}: the signature {SIGNATURE} does not verify with the public key "
                              f"{os.fspath(public_key)!r} ({type(exc).__name__}: {exc}); the bundle was changed, "
                              f"or signed with another key") from None
