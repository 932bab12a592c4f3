"""The weight-file format: the Python writer/reader against the spec, and the C parser against the same files."""

import struct
import zlib

import numpy as np
import pytest

from nnpartials.errors import WeightFileError
from nnpartials.exporter.nnp import (ACTIVATIONS, SELU_ALPHA, SELU_SCALE, Layer, activation_ref, forward_ref,
                                     read_nnp, write_nnp)

import nnpartials._core as C  # noqa: E402  (built by pip install: a missing build fails, never skips)

PARAMS = {"leaky_relu": (0.2, 0.0), "elu": (0.7, 0.0), "selu": (SELU_ALPHA, SELU_SCALE),
          "hard_sigmoid": (1 / 6, 0.5)}


def small_layers(seed=0):
    rng = np.random.default_rng(seed)
    return [Layer(rng.normal(size=(3, 4)), rng.normal(size=4), "tanh"),
            Layer(rng.normal(size=(4, 2)), rng.normal(size=2), "leaky_relu", 0.2)]


def c_parse(data: bytes) -> int:
    need = C.ffi.new("size_t *")
    return C.lib.nnp_model_bytes(data, len(data), need)


def fix_crc(b: bytearray) -> bytes:
    struct.pack_into("<I", b, len(b) - 4, zlib.crc32(bytes(b[:-4])) & 0xFFFFFFFF)
    return bytes(b)


def test_layout_matches_spec():
    layers = small_layers()
    data = write_nnp(layers)
    assert data[:4] == b"NNPK"
    version, n_in, n_out, n_layers, flags, size = struct.unpack_from("<IIIIIQ", data, 4)
    assert (version, n_in, n_out, n_layers, flags, size) == (1, 3, 2, 2, 0, len(data))
    rows, cols, act, reserved, p0, p1 = struct.unpack_from("<IIIIff", data, 32 + 24)
    assert (rows, cols, act, reserved) == (4, 2, ACTIVATIONS["leaky_relu"], 0)
    assert p0 == pytest.approx(0.2) and p1 == 0.0
    # parameters: W row-major then b, layer by layer
    off = 32 + 2 * 24
    W0 = np.frombuffer(data, "<f4", 12, off).reshape(3, 4)
    np.testing.assert_array_equal(W0, layers[0].W)
    b0 = np.frombuffer(data, "<f4", 4, off + 48)
    np.testing.assert_array_equal(b0, layers[0].b)
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == zlib.crc32(data[:-4])


def test_roundtrip_every_activation():
    rng = np.random.default_rng(1)
    layers = [Layer(rng.normal(size=(2, 2)), rng.normal(size=2), a, *PARAMS.get(a, (0.0, 0.0))) for a in ACTIVATIONS]
    back = read_nnp(write_nnp(layers))
    for a, b in zip(layers, back):
        np.testing.assert_array_equal(a.W, b.W)
        np.testing.assert_array_equal(a.b, b.b)
        assert a.activation == b.activation
        assert b.p0 == pytest.approx(a.p0) and b.p1 == pytest.approx(a.p1)
    assert c_parse(write_nnp(layers)) == 0


def test_unused_parameters_are_written_as_zero():
    data = write_nnp([Layer(np.eye(2), np.zeros(2), "tanh", p0=3.0, p1=4.0)])
    assert struct.unpack_from("<ff", data, 32 + 16) == (0.0, 0.0)


def test_writer_rejects_bad_layers():
    with pytest.raises(ValueError, match="inputs"):
        write_nnp([Layer(np.eye(2), np.zeros(2)), Layer(np.ones((3, 1)), np.zeros(1))])
    with pytest.raises(ValueError, match="finite"):
        write_nnp([Layer(np.array([[np.nan]]), np.zeros(1))])
    with pytest.raises(ValueError, match="unknown activation"):
        Layer(np.eye(2), np.zeros(2), "mish")
    with pytest.raises(ValueError):
        write_nnp([])


# (mutation, expected C code)
def _mutations():
    good = write_nnp(small_layers())
    n = len(good)
    p_off = 32 + 2 * 24

    def m(fn, fixcrc=True):
        b = bytearray(good)
        fn(b)
        return fix_crc(b) if fixcrc else bytes(b)

    return [
        ("bad magic", m(lambda b: b.__setitem__(0, ord("X")), False), -3),
        ("version 2", m(lambda b: struct.pack_into("<I", b, 4, 2)), -4),
        ("flags", m(lambda b: struct.pack_into("<I", b, 20, 1)), -5),
        ("reserved", m(lambda b: struct.pack_into("<I", b, 32 + 12, 1)), -5),
        ("unused p1 of tanh", m(lambda b: struct.pack_into("<f", b, 32 + 20, 1.0)), -5),
        ("zero layers", m(lambda b: struct.pack_into("<I", b, 16, 0)), -6),
        ("4097 layers", m(lambda b: struct.pack_into("<I", b, 16, 4097)), -6),
        ("n_in mismatch", m(lambda b: struct.pack_into("<I", b, 8, 5)), -6),
        ("dims do not chain", m(lambda b: struct.pack_into("<I", b, 32 + 4, 5)), -6),
        ("dimension too large", m(lambda b: struct.pack_into("<I", b, 32, 70000)), -6),
        ("activation 15", m(lambda b: struct.pack_into("<I", b, 32 + 8, 15)), -7),
        ("file_size too large", m(lambda b: struct.pack_into("<Q", b, 24, n + 1)), -2),
        ("file_size too small", m(lambda b: struct.pack_into("<Q", b, 24, n - 1)), -8),
        ("consistent dims, wrong size",
         m(lambda b: (struct.pack_into("<I", b, 12, 1), struct.pack_into("<I", b, 32 + 24 + 4, 1))), -8),
        ("flipped weight", m(lambda b: b.__setitem__(p_off + 1, b[p_off + 1] ^ 4), False), -9),
        ("NaN weight", m(lambda b: struct.pack_into("<f", b, p_off, float("nan"))), -10),
        ("inf bias", m(lambda b: struct.pack_into("<f", b, n - 8, float("inf"))), -10),
        ("inf alpha", m(lambda b: struct.pack_into("<f", b, 32 + 24 + 16, float("inf"))), -10),
        ("trailing byte", good + b"\0", -8),
    ]


@pytest.mark.parametrize("name,data,code", _mutations(), ids=[m[0] for m in _mutations()])
def test_corruptions_rejected_by_both_parsers(name, data, code):
    assert c_parse(data) == code, C.ffi.string(C.lib.nnp_strerror(c_parse(data))).decode()
    with pytest.raises(WeightFileError) as ei:
        read_nnp(data)
    assert ei.value.code == code


def test_every_prefix_is_truncated():
    good = write_nnp(small_layers())
    for n in range(len(good)):
        assert c_parse(good[:n]) == -2, n
        with pytest.raises(WeightFileError) as ei:
            read_nnp(good[:n])
        assert ei.value.code == -2


def test_every_bit_flip_rejected():
    good = bytearray(write_nnp(small_layers()))
    for i in range(len(good)):
        for bit in range(8):
            b = bytearray(good)
            b[i] ^= 1 << bit
            assert c_parse(bytes(b)) != 0, (i, bit)


def test_reference_activations_basic_values():
    z = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_allclose(activation_ref("relu", z), [0, 0, 2])
    np.testing.assert_allclose(activation_ref("leaky_relu", z, 0.2), [-0.2, 0, 2])
    np.testing.assert_allclose(activation_ref("hard_sigmoid", z, 0.2, 0.5), [0.3, 0.5, 0.9])
    np.testing.assert_allclose(activation_ref("swish", z), z / (1 + np.exp(-z)))
    layers = small_layers()
    x = np.ones((1, 3))
    h = np.tanh(x @ layers[0].W.astype(np.float64) + layers[0].b)
    o = h @ layers[1].W.astype(np.float64) + layers[1].b
    np.testing.assert_allclose(forward_ref(layers, x), np.where(o > 0, o, 0.2 * o), rtol=1e-6)
