"""The C core on its own: `make test valgrind sanitize`, a short libFuzzer run, warnings under both compilers,
and the standalone example compiled with plain `cc` against Kernel's results."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
FUZZ_SECONDS = int(os.environ.get("NNP_FUZZ_SECONDS", "20"))

needs_cc = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None,
                              reason="needs a C compiler (cc) and make")


def _run(cmd, timeout=600, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _clang_fuzzer_available():
    if shutil.which("clang") is None:
        return False
    r = subprocess.run(["clang", "-fsanitize=fuzzer", "-x", "c", "-", "-o", os.devnull],
                       input="#include <stdint.h>\n#include <stddef.h>\n"
                             "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n",
                       capture_output=True, text=True)
    return r.returncode == 0


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """A private copy of csrc/ so that parallel runs and the developer's csrc/out are not disturbed."""
    d = tmp_path_factory.mktemp("csrc") / "csrc"
    shutil.copytree(CSRC, d, ignore=shutil.ignore_patterns("out"))
    return str(d)


@needs_cc
def test_make_test(out_dir):
    r = _run(["make", "-C", out_dir, "test"])
    assert " 0 failed" in r.stdout


@needs_cc
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (apt-get install valgrind)")
def test_make_valgrind(out_dir):
    _run(["make", "-C", out_dir, "valgrind"], timeout=900)


@needs_cc
def test_make_sanitize(out_dir):
    # ASan/UBSan runtimes ship with gcc (libasan, libubsan) and with clang (libclang-rt)
    probe = subprocess.run(["cc", "-fsanitize=address,undefined", "-x", "c", "-", "-o", os.devnull],
                           input="int main(void) { return 0; }\n", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the compiler has no ASan/UBSan runtime: {probe.stderr.strip()[:200]}")
    r = _run(["make", "-C", out_dir, "sanitize"], timeout=900)
    assert " 0 failed" in r.stdout


@needs_cc
@pytest.mark.skipif(not _clang_fuzzer_available(),
                    reason="clang with libFuzzer is not installed (apt-get install clang libclang-rt-dev)")
def test_make_fuzz(out_dir):
    r = _run(["make", "-C", out_dir, "fuzz", f"FUZZ_SECONDS={FUZZ_SECONDS}"], timeout=FUZZ_SECONDS + 300)
    log = r.stdout + r.stderr
    assert "Done" in log and "ERROR" not in log


@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_warning_free(compiler, tmp_path):
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    flags = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-ffp-contract=fast"]
    for src in ("nnp.c", "tests/test_nnp.c", "examples/nnp_predict.c", "fuzz/fuzz_parse.c", "bench/nnp_bench.c"):
        _run([compiler, *flags, "-I", CSRC, "-c", os.path.join(CSRC, src), "-o", str(tmp_path / "x.o")])
    # and the portable build without vector extensions or dispatch
    _run([compiler, *flags, "-DNNP_NO_DISPATCH", "-c", os.path.join(CSRC, "nnp.c"), "-o", str(tmp_path / "y.o")])


def _build_example(tmp_path):
    exe = str(tmp_path / "nnp_predict")
    _run(["cc", "-std=c99", "-O2", "-I", CSRC, os.path.join(CSRC, "examples", "nnp_predict.c"),
          os.path.join(CSRC, "nnp.c"), "-lm", "-o", exe])
    return exe


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
def test_standalone_example_matches_kernel(tmp_path, seed_bundle):
    pytest.importorskip("nnpartials._core", reason="the C extension is not built")
    from nnpartials.runtime.kernel import Kernel

    exe = _build_example(tmp_path)
    model = os.path.join(seed_bundle, "model.nnp")
    x = np.random.default_rng(0).uniform(-5, 5, (40, 2)).astype(np.float32)
    lines = ["# x1, x2", ""] + [f"{a!r}, {b!r}" if i % 2 else f"{a!r} {b!r}" for i, (a, b) in
                                enumerate(x.astype(float).tolist())]
    r = _run([exe, model], input="\n".join(lines) + "\n")
    got = np.array([[float(v) for v in line.split()] for line in r.stdout.strip().splitlines()])
    y, J = Kernel(model).jacobian(x)
    assert got.shape == (40, 1 + 2)
    np.testing.assert_allclose(got[:, :1], y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[:, 1:], J.reshape(40, -1), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
def test_standalone_example_errors(tmp_path, seed_bundle):
    exe = _build_example(tmp_path)
    model = os.path.join(seed_bundle, "model.nnp")
    r = subprocess.run([exe, model], input="1 2 3\n", capture_output=True, text=True)
    assert r.returncode == 1 and "expected 2 numbers" in r.stderr
    r = subprocess.run([exe, model], input="1 abc\n", capture_output=True, text=True)
    assert r.returncode == 1
    for line in ("nan 1", "1 -inf", "1e39 0"):  # strtod reads these; the last overflows float
        r = subprocess.run([exe, model], input=f"0 0\n{line}\n", capture_output=True, text=True)
        assert r.returncode == 1 and "line 2: an input value is NaN or infinite" in r.stderr, (line, r.stderr)
        assert len(r.stdout.splitlines()) == 1  # the good line's partials, nothing for the bad one
    bad = tmp_path / "bad.nnp"
    with open(model, "rb") as f:
        bad.write_bytes(f.read()[:-1])
    r = subprocess.run([exe, str(bad)], input="", capture_output=True, text=True)
    assert r.returncode == 1 and "truncated" in r.stderr
    r = subprocess.run([exe], capture_output=True, text=True)
    assert r.returncode == 2


def test_cdef_matches_header():
    """Every function and constant of nnp.h is declared identically in the cffi cdef."""
    import re

    sys.path.insert(0, CSRC)
    try:
        import importlib

        build_ffi = importlib.import_module("build_ffi")
    finally:
        sys.path.remove(CSRC)
    with open(os.path.join(CSRC, "nnp.h")) as f:
        header = f.read()
    norm = lambda s: re.sub(r"\s+", " ", s).strip()  # noqa: E731
    protos = re.findall(r"^(?:const )?(?:int|size_t|char) \*?nnp_\w+\([^;]*\);", header, re.M)
    assert len(protos) >= 12
    cdef = norm(build_ffi.CDEF)
    for p in protos:
        assert norm(p) in cdef, p
    for name, value in re.findall(r"#define (NNP_(?:E_\w+|OK|MODE_\w+|WS_\w+|ACT_\w+))\s+\(?(-?\d+)\)?", header):
        assert re.search(rf"#define {name} {value}\b", build_ffi.CDEF), name
