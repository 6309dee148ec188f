"""Engine fixtures (helpers in tiny.py)."""

from __future__ import annotations

import pytest
from tiny import TINY_MR, make_bundle


@pytest.fixture
def tiny_bundle(tmp_path):
    return make_bundle(tmp_path / "tiny-student")


@pytest.fixture(scope="session")
def tiny_bundle_session(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundles") / "tiny-student")


@pytest.fixture(scope="session")
def tiny_mr_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundles") / "tiny-mr-student", profile=TINY_MR)
