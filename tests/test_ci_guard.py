"""The CI guard (ci_skips.py): under CI=true a skip fails the run, whether a test skips or a whole module skips at
import; outside CI a skip stays a skip. Each case runs pytest in a subprocess on a tiny test folder."""

import os
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def _pytest(folder, files, ci):
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    (folder / "pytest.ini").write_text("[pytest]\n")  # keeps the project's configuration out
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join([TESTS] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if ci is not None:
        env["CI"] = ci
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "ci_skips", "-rA",
                        str(folder)], capture_output=True, text=True, env=env, timeout=300)
    return r.returncode, r.stdout + r.stderr


MODULE_SKIP = """
    import pytest

    pytest.importorskip("no_such_module_xyz")


    def test_never_runs():
        pass
"""
PASSING = """
    def test_fine():
        pass
"""
TEST_SKIP = """
    import pytest


    def test_skips():
        pytest.skip("the widget is missing")


    @pytest.mark.skipif(True, reason="no gizmo here")
    def test_marked():
        pass
"""


def test_project_conftest_loads_the_guard(request):
    assert request.config.pluginmanager.has_plugin("ci_skips")


@pytest.mark.parametrize("ci", ["true", "1"])
def test_module_skip_fails_under_ci(tmp_path, ci):
    rc, out = _pytest(tmp_path, {"test_mod.py": MODULE_SKIP, "test_other.py": PASSING}, ci=ci)
    assert rc == 1, out
    assert "skipped under CI=true" in out and "no_such_module_xyz" in out, out
    assert "test_mod.py:4" in out, out  # where the module skipped
    assert "1 failed, 1 passed" in out, out  # and the rest of the run went on


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_module_skip_is_a_skip_outside_ci(tmp_path, ci):
    rc, out = _pytest(tmp_path, {"test_mod.py": MODULE_SKIP, "test_other.py": PASSING}, ci=ci)
    assert rc == 0, out
    assert "1 passed, 1 skipped" in out and "skipped under CI" not in out, out


def test_test_skip_fails_under_ci(tmp_path):
    rc, out = _pytest(tmp_path, {"test_mod.py": TEST_SKIP}, ci="true")
    assert rc == 1, out
    assert "1 failed, 1 error" in out, out  # a skip mark is reported at setup, so as an error
    assert "skipped under CI=true, where every prerequisite must be present" in out, out
    assert "the widget is missing" in out and "no gizmo here" in out, out


def test_test_skip_is_a_skip_outside_ci(tmp_path):
    rc, out = _pytest(tmp_path, {"test_mod.py": TEST_SKIP}, ci=None)
    assert rc == 0 and "2 skipped" in out, out


def test_allowed_skips_and_xfail_pass_under_ci(tmp_path):
    files = {
        "test_gpu.py": """
            import pytest

            pytest.importorskip("no_such_module_xyz", reason="needs a CUDA device")


            def test_never_runs():
                pass
        """,
        "test_mixed.py": """
            import pytest


            def test_peers():
                pytest.skip("PyTorch is not installed (the [peers] extra)")


            @pytest.mark.xfail(reason="known", strict=True)
            def test_known_failure():
                assert False
        """,
    }
    rc, out = _pytest(tmp_path, files, ci="true")
    assert rc == 0, out
    assert "2 skipped, 1 xfailed" in out and "skipped under CI" not in out, out
