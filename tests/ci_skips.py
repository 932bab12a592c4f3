"""pytest plugin: under CI (CI=true, as .ci/run sets it) a skip is a failure, except for the skips that depend on
hardware or on optional extras that CI deliberately does not install (CI_ALLOWED_SKIPS).

Both kinds of skip are covered: a test that skips (a skip mark, `pytest.skip` in the test or a fixture) is reported
as failed, and a whole module (or other collector) that skips while it is collected (`pytest.importorskip` or
`pytest.skip(allow_module_level=True)` at module level) is replaced by one test that fails with the reason, so that
the rest of the run goes on and the summary counts it as a failure.

Registered by tests/conftest.py through `pytest_plugins`; load it elsewhere with `-p ci_skips` (tests/ on sys.path).
"""

import os

import pytest

CI_ALLOWED_SKIPS = ("CUDA", "cuda", "[peers]", "jax", "JAX", "torch", "PyTorch")
PREFIX = "skipped under CI=true, where every prerequisite must be present: "


def _under_ci():
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _reason(report):
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)


def _allowed(reason):
    return any(tag in reason for tag in CI_ALLOWED_SKIPS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not _under_ci() or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _reason(report)
    if _allowed(reason):
        return
    report.outcome = "failed"
    report.longrepr = PREFIX + reason


class CollectionSkip(pytest.Item):
    """Stands in for a module that skipped at collection under CI=true, and fails with the skip's reason."""

    def __init__(self, *, message, **kw):
        super().__init__(**kw)
        self.message = message

    def runtest(self):
        pytest.fail(self.message, pytrace=False)

    def reportinfo(self):
        return self.path, None, self.name


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if not _under_ci() or not report.skipped:
        return
    reason = _reason(report)
    if _allowed(reason):
        return
    where = ""
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        where = f" ({os.path.basename(str(report.longrepr[0]))}:{report.longrepr[1]})"
    item = CollectionSkip.from_parent(collector, name="[module skipped at collection]",
                                      message=f"{PREFIX}{reason}{where}")
    report.outcome = "passed"
    report.longrepr = None
    report.result = [item]
