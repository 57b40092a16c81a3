"""Fixtures of the tunnel tests: keys generated once per session."""

from __future__ import annotations

import pytest

from tpconf.tunnel import ProxyKeys


@pytest.fixture(scope="session")
def keys() -> ProxyKeys:
    return ProxyKeys.generate(comment="test")


@pytest.fixture(scope="session")
def other_keys() -> ProxyKeys:
    return ProxyKeys.generate(comment="other")
