import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_dataset_cache(tmp_path_factory):
    """Keep the parsed-dataset cache of the test session out of the user's home."""
    old = os.environ.get("COVSHIFT_CACHE")
    os.environ["COVSHIFT_CACHE"] = str(tmp_path_factory.mktemp("covshift-cache"))
    yield
    if old is None:
        os.environ.pop("COVSHIFT_CACHE", None)
    else:
        os.environ["COVSHIFT_CACHE"] = old
