import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py

import pytest  # noqa: E402


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
