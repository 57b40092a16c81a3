"""Fixtures of the e2e tests beyond the cluster's (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import E2ECluster
from tests.e2e.laptop import Laptop, make_laptop


@pytest.fixture
def laptop(cluster: E2ECluster, tmp_path: Path) -> Iterator[Laptop]:
    """A laptop network namespace whose only way to the cluster is tpconf (tests/e2e/laptop.py)."""
    with make_laptop(cluster, tmp_path) as made:
        yield made
