import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py

import pytest  # noqa: E402

# Under CI (CI=true, as .ci/run sets it) a skipped test, or a test module skipped at import, is a failure, except
# for the skips that depend on hardware or on optional extras that CI deliberately does not install: ci_skips.py.
pytest_plugins = ["ci_skips"]


@pytest.fixture(scope="session")
def seed_bundle(tmp_path_factory):
    """The seed network exported once per test session (bundle folder path)."""
    import models

    import nnpartials

    out = tmp_path_factory.mktemp("bundles") / "seed"
    nnpartials.export(models.seed_model(), out)
    return str(out)


@pytest.fixture(scope="session")
def multi_bundle(tmp_path_factory):
    import models

    import nnpartials

    out = tmp_path_factory.mktemp("bundles") / "multi"
    nnpartials.export(models.multi_input_model(), out)
    return str(out)

