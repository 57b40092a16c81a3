"""Per-proxy keys: OpenSSH formats, the Secret round trip, nothing secret in repr."""

from __future__ import annotations

import pytest

from tpconf.errors import TunnelError
from tpconf.tunnel import AGENT_SECRET_KEYS, ProxyKeys
from tpconf.tunnel.keys import AUTHORIZED_KEYS, CLIENT_PRIVATE_KEY, HOST_PRIVATE_KEY


def test_keys_are_ed25519_in_the_formats_sshd_reads(keys: ProxyKeys) -> None:
    for private in (keys.client_private_key, keys.host_private_key):
        assert private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    for public in (keys.client_public_key, keys.host_public_key):
        assert public.startswith("ssh-ed25519 AAAA") and public.count("\n") <= 1
    assert keys.client_public_key.split()[1] != keys.host_public_key.split()[1]


def test_keys_round_trip_through_the_secret_data(keys: ProxyKeys) -> None:
    data = keys.to_secret_data()
    assert all(isinstance(value, str) for value in data.values())
    assert set(AGENT_SECRET_KEYS) <= set(data) and CLIENT_PRIVATE_KEY not in AGENT_SECRET_KEYS
    assert data[AUTHORIZED_KEYS] == keys.client_public_key
    assert ProxyKeys.from_secret_data(data) == keys


def test_a_secret_with_mismatched_or_missing_keys_is_refused(
    keys: ProxyKeys, other_keys: ProxyKeys
) -> None:
    data = keys.to_secret_data()
    with pytest.raises(TunnelError, match="does not match"):
        ProxyKeys.from_secret_data({**data, HOST_PRIVATE_KEY: other_keys.host_private_key})
    with pytest.raises(TunnelError, match="lacks authorized_keys"):
        ProxyKeys.from_secret_data({k: v for k, v in data.items() if k != AUTHORIZED_KEYS})
    with pytest.raises(TunnelError, match="do not parse"):
        ProxyKeys.from_secret_data({**data, CLIENT_PRIVATE_KEY: "garbage"})


def test_repr_shows_no_private_key(keys: ProxyKeys) -> None:
    assert "PRIVATE" not in repr(keys) and "PRIVATE" not in repr(keys.credentials("u"))
