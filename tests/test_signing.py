"""Signed bundles: export --sign, nnpartials verify, load_bundle/Partials/Kernel(key=...)."""

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import onnx
import pytest

import models
import nnpartials
from nnpartials.cli import main
from nnpartials.errors import BundleError, ExportError
from nnpartials.bundle import load_bundle

import model_signing  # noqa: E402,F401  (the [sign] extra, installed by [test]: a missing one fails, never skips)
from nnpartials.bundle import sign_bundle, verify_bundle  # noqa: E402


def write_keys(folder, name, curve=None):
    """An EC key pair in PEM (private PKCS#8, public SubjectPublicKeyInfo): returns (private path, public path)."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(curve or ec.SECP256R1())
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture
def keys(tmp_path):
    k = tmp_path / "keys"
    k.mkdir()
    return write_keys(k, "signer")


@pytest.fixture
def other_keys(tmp_path):
    k = tmp_path / "other"
    k.mkdir()
    return write_keys(k, "other")


@pytest.fixture
def signed(seed_bundle, tmp_path, keys):
    dst = tmp_path / "signed"
    shutil.copytree(seed_bundle, dst)
    sign_bundle(dst, keys[0])
    return dst


def rewrite(dst, name, data):
    """Replace a file and re-hash it in the manifest, so that only the signature can tell."""
    (dst / name).write_bytes(data)
    m = json.loads((dst / "manifest.json").read_text())
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (dst / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def test_signed_bundle_verifies(signed, keys):
    assert (signed / "model.sig").is_file()
    b = verify_bundle(signed, keys[1])
    assert "model.sig" not in b.manifest["files"]  # it signs the manifest, so the manifest cannot list it
    assert load_bundle(signed).files == b.files  # without a key the signature is simply not read
    x = np.array([[1.0, 1.5], [2.0, 3.0]], np.float32)
    y, j = nnpartials.Partials(signed, key=keys[1]).jacobian(x)
    y_c, j_c = nnpartials.Kernel(signed, key=keys[1]).jacobian(x)
    np.testing.assert_allclose(j, j_c, rtol=1e-4, atol=1e-5)
    assert nnpartials.Partials(b, key=keys[1]).n_in == 2  # a loaded Bundle is verified again from its folder


def test_unsigned_bundle_with_a_key_is_refused(seed_bundle, keys):
    for load in (lambda: load_bundle(seed_bundle, key=keys[1]), lambda: nnpartials.Partials(seed_bundle, key=keys[1]),
                 lambda: nnpartials.Kernel(seed_bundle, key=keys[1])):
        with pytest.raises(BundleError, match="is not signed"):
            load()


def test_wrong_key_is_refused(signed, other_keys):
    with pytest.raises(BundleError, match="does not verify with the public key"):
        nnpartials.Partials(signed, key=other_keys[1])
    with pytest.raises(BundleError, match="does not verify"):
        nnpartials.Kernel(signed, key=other_keys[1])


def test_tampered_and_rehashed_bundle_is_refused(signed, keys):
    model = onnx.load_model_from_string((signed / "model.onnx").read_bytes())
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    w = np.frombuffer(init.raw_data, np.float32).copy()
    w[0] += 1.0
    init.raw_data = w.tobytes()
    rewrite(signed, "model.onnx", model.SerializeToString())
    load_bundle(signed)  # consistent hashes: only the signature catches it
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(signed, key=keys[1])


def test_changed_manifest_is_refused(signed, keys):
    m = json.loads((signed / "manifest.json").read_text())
    m["inputs"][0]["columns"] = ["a", "b"]
    (signed / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    load_bundle(signed)
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(signed, key=keys[1])


@pytest.mark.parametrize("damage", ["garbage", "empty", "symlink", "folder", "from another bundle"])
def test_damaged_signature_is_refused(signed, keys, multi_bundle, tmp_path, damage):
    sig = signed / "model.sig"
    if damage == "garbage":
        sig.write_text("{not a signature")
    elif damage == "empty":
        sig.write_bytes(b"")
    elif damage == "symlink":
        shutil.move(sig, tmp_path / "elsewhere.sig")
        os.symlink(tmp_path / "elsewhere.sig", sig)
    elif damage == "folder":
        os.remove(sig)
        sig.mkdir()
    else:  # a valid signature by the same key, over another bundle
        other = tmp_path / "other"
        shutil.copytree(multi_bundle, other)
        sign_bundle(other, keys[0])
        shutil.copy(other / "model.sig", sig)
    with pytest.raises(BundleError, match="model.sig"):
        load_bundle(signed, key=keys[1])


def test_kernel_key_needs_a_bundle_folder(signed, keys):
    with pytest.raises(BundleError, match="bundle folder"):
        nnpartials.Kernel((signed / "model.nnp").read_bytes(), key=keys[1])


def test_bad_public_key_is_a_bundle_error(signed, keys, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(signed, key=tmp_path / "missing.pem")
    with pytest.raises(BundleError, match="not a PEM public key"):
        load_bundle(signed, key=keys[0])  # the private key


def test_cli_export_sign_and_verify(tmp_path, keys, other_keys, capsys):
    m = models.dense_model("tanh", n_in=2, units=(4,), n_out=1)
    m.save(tmp_path / "m.keras")
    out = tmp_path / "bundle"
    assert main(["export", str(tmp_path / "m.keras"), "-o", str(out), "--sign", str(keys[0])]) == 0
    assert (out / "model.sig").is_file()
    assert sorted(os.listdir(tmp_path)) == ["bundle", "keys", "m.keras", "other"]  # appeared whole, nothing left
    capsys.readouterr()
    assert main(["verify", str(out), "--key", str(keys[1])]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["verify", str(out), "--key", str(other_keys[1])]) == 1
    assert "does not verify" in capsys.readouterr().err
    os.remove(out / "model.sig")
    assert main(["verify", str(out), "--key", str(keys[1])]) == 1
    assert "not signed" in capsys.readouterr().err


def test_cli_verify_tampered_bundle_fails(signed, keys, capsys):
    data = bytearray((signed / "validation.json").read_bytes())
    data[-2:-1] = b" "
    rewrite(signed, "validation.json", bytes(data))
    assert main(["verify", str(signed), "--key", str(keys[1])]) == 1
    assert "does not verify" in capsys.readouterr().err


@pytest.fixture
def no_model_load(monkeypatch):
    from nnpartials.exporter import keras_export

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the signing key was checked")

    monkeypatch.setattr(keras_export, "load_model", boom)


def test_export_checks_the_signing_key_before_any_work(tmp_path, keys, no_model_load):
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    with pytest.raises(ExportError, match="does not exist"):
        nnpartials.export("m.keras", tmp_path / "o", sign=tmp_path / "missing.pem")
    with pytest.raises(ExportError, match="not a PEM private key"):
        nnpartials.export("m.keras", tmp_path / "o", sign=keys[1])  # the public key
    ed = tmp_path / "ed.pem"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                                      ser.NoEncryption()))
    with pytest.raises(ExportError, match="elliptic-curve key"):
        nnpartials.export("m.keras", tmp_path / "o", sign=ed)
    assert not (tmp_path / "o").exists()


def test_missing_library_names_the_extra(signed, keys, tmp_path, monkeypatch, no_model_load):
    for mod in [m for m in sys.modules if m == "model_signing" or m.startswith("model_signing.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "model_signing", None)  # import model_signing -> ImportError
    with pytest.raises(BundleError, match=r"pip install 'nnpartials\[sign\]'"):
        load_bundle(signed, key=keys[1])
    with pytest.raises(ExportError, match=r"pip install 'nnpartials\[sign\]'"):
        nnpartials.export("m.keras", tmp_path / "o", sign=keys[0])
    load_bundle(signed)  # loading without a key never needs it


def test_resigning_replaces_the_signature(signed, keys, other_keys):
    sign_bundle(signed, other_keys[0])
    verify_bundle(signed, other_keys[1])
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(signed, keys[1])
    assert not [p for p in os.listdir(signed) if p.startswith(".")]
