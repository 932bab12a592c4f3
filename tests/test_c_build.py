"""The C core on its own: `make test valgrind sanitize` (the C tests cover every function of nnp.h, second derivatives
included), a short libFuzzer run (every compute function), the plain-C (-DNNP_PLAIN_C, with and without run-time
dispatch) and no-dispatch (-DNNP_NO_DISPATCH, for the baseline and with -march=native) builds' tests, warnings under
both compilers, the standalone example compiled with plain `cc` exactly as README.md says against Kernel's results,
and the lists of the library's source files in its builds.

Compiling the library (csrc/nnp*.c) takes from a few seconds to over a minute of CPU per flavour, so each flavour is
built once per session, in its own out-<flavour> folder of one private copy of csrc/, and make's own dependency
tracking lets every later test reuse it. Time limits are generous (a busy 2-core machine); a step that runs out of
time fails with its name, its command and the limit."""

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
FUZZ_SECONDS = int(os.environ.get("NNP_FUZZ_SECONDS", "20"))
BUILD_TIMEOUT = 1800  # one make target of one flavour (the sanitizer and libFuzzer builds: ~1 min of CPU each)
RUN_TIMEOUT = 600  # running the C tests of a normal build
SLOW_RUN_TIMEOUT = 1800  # running them under valgrind or ASan/UBSan
WARN_FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-ffp-contract=fast"]

needs_cc = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None,
                              reason="needs a C compiler (cc) and make")


def _text(b):
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _run(step, cmd, timeout, input=None):
    """Run one step; a step that runs out of time is killed with all its children (compilers under make) and the
    test fails naming the step, its command and the limit."""
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"step '{step}' ran out of time ({timeout} s limit): {' '.join(cmd)}\n"
                    f"{_text(out)[-2000:]}\n{_text(err)[-2000:]}", pytrace=False)
    assert p.returncode == 0, f"step '{step}' failed ({p.returncode}): {' '.join(cmd)}\n{out[-4000:]}\n{err[-4000:]}"
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _clang_fuzzer_available():
    if shutil.which("clang") is None:
        return False
    r = subprocess.run(["clang", "-fsanitize=fuzzer", "-x", "c", "-", "-o", os.devnull],
                       input="#include <stdint.h>\n#include <stddef.h>\n"
                             "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n",
                       capture_output=True, text=True)
    return r.returncode == 0


class Flavours:
    """make in one private copy of csrc/, one out-<name> folder per flavour (compiler, CFLAGS, OPTFLAGS). Two names
    for the same flavour (cc and gcc are often one compiler) share a folder, so it is compiled once."""

    def __init__(self, csrc):
        self.csrc = csrc
        self.names = {}

    def make(self, name, targets, step, cc="cc", cflags="", optflags=None, timeout=BUILD_TIMEOUT, **variables):
        key = (os.path.realpath(shutil.which(cc) or cc), cflags, optflags)
        out = "out-" + self.names.setdefault(key, name)
        targets = [t.format(out=out) for t in targets]  # "{out}/file": a file in the flavour's folder
        cmd = ["make", "-C", self.csrc, f"CC={cc}", f"OUT={out}", f"CFLAGS={cflags}"]
        cmd += [f"OPTFLAGS={optflags}"] if optflags else []
        cmd += [f"{k}={v}" for k, v in variables.items()] + list(targets)
        return _run(f"{step} [{name}: make {' '.join(targets)}]", cmd, timeout)

    def build(self, name, targets=("all",), **kw):
        """Compile (nothing when the flavour is already built), with its own time limit, apart from any run."""
        return self.make(name, targets, "build", **kw)


@pytest.fixture(scope="session")
def flavours(tmp_path_factory):
    """A private copy of csrc/ so that parallel runs and the developer's csrc/out are not disturbed."""
    d = tmp_path_factory.mktemp("csrc") / "csrc"
    shutil.copytree(CSRC, d, ignore=shutil.ignore_patterns("out", "out-*"))
    return Flavours(str(d))


@needs_cc
def test_make_test(flavours):
    flavours.build("default")
    r = flavours.make("default", ["test"], "run the C tests", timeout=RUN_TIMEOUT)
    assert " 0 failed" in r.stdout


@needs_cc
@pytest.mark.skipif(shutil.which("clang") is None, reason="clang is not installed (apt-get install clang)")
def test_make_test_with_clang(flavours):
    """The C tests built by Clang, once per kernel set this CPU runs (NNP_MAX_ISA). Clang fuses multiply-adds such as
    tanh's 1 - a * a in the AVX2+FMA build, so the baseline pass fails where a kernel ignores the cap (the single-point
    path once did: its AVX2 results against the baseline batch path's, 24 failed checks)."""
    flavours.build("clang", cc="clang")
    r = flavours.make("clang", ["test"], "run the C tests", cc="clang", timeout=RUN_TIMEOUT)
    assert r.stdout.count(" 0 failed") == 3, r.stdout[-2000:]


@needs_cc
@pytest.mark.parametrize("name, cflags, optflags", [
    # the plain C99 kernels instead of the vector-extension ones, in both builds of the run-time dispatch (on an
    # AVX2 machine the AVX2+FMA one runs)
    ("plain-c", "-DNNP_PLAIN_C", None),
    # the same without dispatch, as a compiler without GNU extensions builds them (for the baseline target)
    ("plain-c-no-dispatch", "-DNNP_PLAIN_C -DNNP_NO_DISPATCH", None),
    # vector extensions built once for the target, without the AVX2 clones; at -O2, the warnings' level of old
    ("no-dispatch", "-DNNP_NO_DISPATCH", "-O2"),
    # built once for this machine's CPU: on one with AVX-512 its kernels without dispatch; every expression may become
    # a fused multiply-add, the test program's own arithmetic included
    ("native-no-dispatch", "-DNNP_NO_DISPATCH -march=native", None),
])
def test_make_test_variant(flavours, name, cflags, optflags):
    flavours.build(name, ["all"], cflags=cflags, optflags=optflags)
    r = flavours.make(name, ["test"], "run the C tests", cflags=cflags, optflags=optflags, timeout=RUN_TIMEOUT)
    assert " 0 failed" in r.stdout


@needs_cc
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (apt-get install valgrind)")
def test_make_valgrind(flavours):
    flavours.build("default")
    flavours.make("default", ["valgrind"], "run the C tests and the example under valgrind", timeout=SLOW_RUN_TIMEOUT)


@needs_cc
def test_make_sanitize(flavours):
    # ASan/UBSan runtimes ship with gcc (libasan, libubsan) and with clang (libclang-rt)
    probe = subprocess.run(["cc", "-fsanitize=address,undefined", "-x", "c", "-", "-o", os.devnull],
                           input="int main(void) { return 0; }\n", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the compiler has no ASan/UBSan runtime: {probe.stderr.strip()[:200]}")
    flavours.build("default", ["{out}/test_nnp_san"])  # a file of its own in the default flavour's folder
    r = flavours.make("default", ["sanitize"], "run the C tests under ASan/UBSan", timeout=SLOW_RUN_TIMEOUT)
    assert " 0 failed" in r.stdout


@needs_cc
@pytest.mark.skipif(not _clang_fuzzer_available(),
                    reason="clang with libFuzzer is not installed (apt-get install clang libclang-rt-dev)")
def test_make_fuzz(flavours):
    flavours.build("default", ["{out}/fuzz_parse"])
    r = flavours.make("default", ["fuzz"], "run libFuzzer", timeout=FUZZ_SECONDS + 300, FUZZ_SECONDS=FUZZ_SECONDS)
    log = r.stdout + r.stderr
    assert "Done" in log and "ERROR" not in log


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_warning_free(flavours, compiler, tmp_path):
    """No warning under -Wall -Wextra -pedantic (and -Werror) from either compiler, with and without dispatch."""
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    # the library, tests/test_nnp.c, examples/nnp_predict.c: the Makefile's build has -Werror. When `compiler` is cc
    # (often gcc) these are flavours that the tests above already built (-O3, and -O2 without dispatch); another
    # compiler builds them at -O2, the level at which this test has always compiled them
    same_as_cc = os.path.realpath(shutil.which(compiler)) == os.path.realpath(shutil.which("cc") or "cc")
    flavours.build(compiler, cc=compiler, optflags=None if same_as_cc else "-O2")
    flavours.build(f"no-dispatch-{compiler}", cc=compiler, cflags="-DNNP_NO_DISPATCH", optflags="-O2")
    # the other two programs, without the library (their builds link it, and it is checked above)
    for src in ("fuzz/fuzz_parse.c", "bench/nnp_bench.c"):
        _run(f"compile {src} with {compiler}",
             [compiler, *WARN_FLAGS, "-I", flavours.csrc, "-c", os.path.join(flavours.csrc, src),
              "-o", str(tmp_path / "x.o")], timeout=BUILD_TIMEOUT)


def _readme_example_command(csrc, exe):
    """README.md's one-line build of the example, word for word, with its csrc/ being `csrc` and its output `exe`;
    a word with a wildcard is expanded as a shell would (sorted)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.startswith("cc ") and "examples/nnp_predict.c" in line]
    assert len(lines) == 1, f"README.md should show exactly one `cc ...` line building the example: {lines}"
    cmd = []
    for word in shlex.split(lines[0]):
        if word == "csrc" or word.startswith("csrc/"):
            word = csrc + word[len("csrc"):]
        if any(c in word for c in "*?["):
            matches = sorted(glob.glob(word))
            assert matches, f"README.md's {word!r} matches no file"
            cmd += matches
        else:
            cmd.append(word)
    assert cmd[cmd.index("-o") + 1] == "nnp_predict", cmd
    cmd[cmd.index("-o") + 1] = exe
    return cmd


def test_readme_example_command_is_what_the_example_says():
    """The example's own comment gives the same build line as README.md."""
    with open(os.path.join(CSRC, "examples", "nnp_predict.c"), encoding="utf-8") as f:
        said = re.search(r"Build: (cc .*)", f.read()).group(1).strip()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert any(line.split("#")[0].strip() == said for line in f), said


@pytest.fixture(scope="session")
def example_exe(flavours, tmp_path_factory):
    """The standalone example built once with plain cc, exactly as README.md and nnp_predict.c tell a user to."""
    exe = str(tmp_path_factory.mktemp("example") / "nnp_predict")
    _run("build the standalone example with plain cc (README)", _readme_example_command(flavours.csrc, exe),
         timeout=BUILD_TIMEOUT)
    return exe


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
def test_standalone_example_matches_kernel(example_exe, seed_bundle):
    pytest.importorskip("nnpartials._core", reason="the C extension is not built")
    from nnpartials.runtime.kernel import Kernel

    model = os.path.join(seed_bundle, "model.nnp")
    x = np.random.default_rng(0).uniform(-5, 5, (40, 2)).astype(np.float32)
    lines = ["# x1, x2", ""] + [f"{a!r}, {b!r}" if i % 2 else f"{a!r} {b!r}" for i, (a, b) in
                                enumerate(x.astype(float).tolist())]
    r = _run("run the standalone example", [example_exe, model], timeout=RUN_TIMEOUT, input="\n".join(lines) + "\n")
    got = np.array([[float(v) for v in line.split()] for line in r.stdout.strip().splitlines()])
    y, J = Kernel(model).jacobian(x)
    assert got.shape == (40, 1 + 2)
    np.testing.assert_allclose(got[:, :1], y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[:, 1:], J.reshape(40, -1), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")
def test_standalone_example_errors(tmp_path, example_exe, seed_bundle):
    exe = example_exe
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


def test_step_out_of_time_names_itself(tmp_path):
    """A step past its limit fails with its name, command and limit, and its children are killed with it."""
    pid_file = tmp_path / "child.pid"
    with pytest.raises(pytest.fail.Exception) as e:
        _run("wait for a slow child", ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout=1)
    assert "step 'wait for a slow child' ran out of time (1 s limit): sh -c sleep 60" in str(e.value)
    child = int(pid_file.read_text())
    for _ in range(50):  # killed, then reaped by init
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with open(f"/proc/{child}/stat") as f:  # still listed (Linux, no reaper): at most a zombie
            assert f.read().split(") ")[1][0] == "Z"


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


def test_c_tests_and_fuzzer_call_every_function():
    """`make test` (and so `make valgrind` and `make sanitize`, which run the same program) calls every function of
    nnp.h, and the libFuzzer harness every compute function (those taking a workspace), second derivatives included."""
    with open(os.path.join(CSRC, "nnp.h")) as f:
        header = f.read()
    protos = re.findall(r"^(?:const )?(?:int|size_t|char) \*?(nnp_\w+)\(([^;]*)\);", header, re.M)
    names = {name for name, _ in protos}
    compute = {name for name, args in protos if "work_len" in args}
    assert {"nnp_hessian", "nnp_laplacian", "nnp_hvp", "nnp_fd_hessian_f64"} <= compute
    for path, wanted in (("tests/test_nnp.c", names), ("fuzz/fuzz_parse.c", compute)):
        with open(os.path.join(CSRC, path)) as f:
            called = set(re.findall(r"\b(nnp_\w+)\(", f.read()))
        assert wanted <= called, f"{path} does not call {sorted(wanted - called)}"


def test_source_lists_agree():
    """The library is every csrc/nnp*.c: the Makefile, the cffi build and the C benchmark list exactly those files,
    and MANIFEST.in ships them and the private headers (the sdist must build)."""
    sys.path.insert(0, CSRC)
    try:
        import importlib

        build_ffi = importlib.import_module("build_ffi")
    finally:
        sys.path.remove(CSRC)
    from benchmarks import cbench

    units = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CSRC, "nnp*.c")))
    headers = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CSRC, "nnp*.h")))
    with open(os.path.join(CSRC, "Makefile")) as f:
        make = f.read()
    assert sorted(re.search(r"^SRCS = (.*)$", make, re.M).group(1).split()) == units
    assert sorted(re.search(r"^HDRS = (.*)$", make, re.M).group(1).split()) == headers
    assert sorted(build_ffi.SOURCES) == units and sorted(build_ffi.HEADERS) == headers
    assert sorted(cbench.LIBRARY_SOURCES) == units
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        manifest = f.read()
    assert re.search(r"^include .*csrc/\*\.c .*csrc/\*\.h", manifest, re.M), "MANIFEST.in must ship csrc/*.c and *.h"
