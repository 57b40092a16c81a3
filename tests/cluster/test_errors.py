"""ApiStatus and transport errors -> tpconf.errors, with real response and exception objects."""

from __future__ import annotations

import json
import socket

import anyio
import pytest
import urllib3

from tpconf import errors
from tpconf.cluster import client as cclient
from tpconf.cluster import errors as cerrors
from tpconf.cluster.client import Cluster, path
from tpconf.cluster.transport import ApiStatus


def api_exception(status: int, reason: str, message: str, status_reason: str) -> ApiStatus:
    """An ApiStatus as the transport raises it: from a real urllib3 response with a Status."""
    body = json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": status_reason,
            "code": status,
        }
    ).encode()
    resp = urllib3.HTTPResponse(body=body, status=status, reason=reason, preload_content=True)
    return ApiStatus.of(resp)


def test_forbidden_names_the_verb_and_resource_and_points_to_the_role() -> None:
    exc = api_exception(
        403,
        "Forbidden",
        'deployments.apps is forbidden: User "system:serviceaccount:dev:tp" cannot create '
        'resource "deployments" in API group "apps" in the namespace "dev"',
        "Forbidden",
    )
    err = cerrors.translate_api(exc, what='create Deployment "web" in namespace "dev"')
    assert isinstance(err, errors.Forbidden)
    assert err.message == (
        'cannot create Deployment "web" in namespace "dev": user '
        '"system:serviceaccount:dev:tp" may not create deployments.apps in namespace "dev"'
    )
    assert err.hint is not None and "`tpconf rbac`" in err.hint and "-n dev" in err.hint


def test_forbidden_subresource_is_named_like_kubectl_auth_can_i() -> None:
    exc = api_exception(
        403,
        "Forbidden",
        'pods "web-1" is forbidden: User "bob" cannot create resource "pods/portforward" in API '
        'group "" in the namespace "dev"',
        "Forbidden",
    )
    err = cerrors.translate_api(exc, what='port-forward to pod "web-1"')
    assert "may not create pods/portforward" in err.message


def test_forbidden_without_the_rbac_sentence_keeps_the_trimmed_message() -> None:
    exc = api_exception(
        403,
        "Forbidden",
        "unable to create new content in namespace dev because it is being terminated" + "x" * 400,
        "Forbidden",
    )
    err = cerrors.translate_api(exc, what="create Deployment")
    assert isinstance(err, errors.Forbidden)
    assert "being terminated" in err.message
    assert len(err.message) < errors.PAYLOAD_MAX + 60


def test_not_found_names_the_object() -> None:
    exc = api_exception(404, "Not Found", 'deployments.apps "web" not found', "NotFound")
    err = cerrors.translate_api(exc, what='read Deployment "web" in namespace "dev"')
    assert isinstance(err, errors.NotFound)
    assert err.message == 'cannot read Deployment "web" in namespace "dev": not found'


def test_conflict_keeps_the_status_reason() -> None:
    exc = api_exception(409, "Conflict", 'deployments.apps "web" already exists', "AlreadyExists")
    err = cerrors.translate_api(exc, what="create")
    assert isinstance(err, cerrors.Conflict)
    assert err.reason == "AlreadyExists"


def test_server_errors_are_transient() -> None:
    exc = api_exception(503, "Service Unavailable", "etcdserver: leader changed", "InternalError")
    err = cerrors.translate_api(exc, what="list pods")
    assert isinstance(err, errors.ClusterUnreachable)
    assert isinstance(err, errors.Transient)


def test_secret_payloads_never_reach_the_message() -> None:
    exc = api_exception(
        422, "Unprocessable Entity", 'Secret "k" is invalid: data[host_key]: PRIVATEBITS', "Invalid"
    )
    err = cerrors.translate_api(exc, what='create Secret "k"', sensitive=True)
    assert "PRIVATEBITS" not in err.render()
    assert err.message == 'cannot create Secret "k": 422 Unprocessable Entity'


@pytest.mark.anyio
async def test_an_unreachable_api_server_is_cluster_unreachable_with_a_hint() -> None:
    # A real connection to a port nobody listens on.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = cclient.from_token(
        f"https://127.0.0.1:{port}", "t", ca_data=None, namespace="dev", retries=0
    )
    try:
        with pytest.raises(errors.ClusterUnreachable) as info:
            with anyio.fail_after(10):
                await cluster.request("GET", path("pods", "dev"), what='list pods in "dev"')
        assert "unreachable" in info.value.message
        assert info.value.hint is not None and "context" in info.value.hint
    finally:
        cluster.close()


def test_connect_with_a_missing_kubeconfig_says_which_file(tmp_path: object) -> None:
    with pytest.raises(errors.ClusterError, match="cannot load the kubeconfig .*nope"):
        cclient.connect(kubeconfig=f"{tmp_path}/nope")


def test_connect_with_an_unknown_context_lists_the_contexts(tmp_path: object) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u", "namespace": "ns1"}}],
        "current-context": "dev",
    }
    path_ = f"{tmp_path}/kubeconfig"
    with open(path_, "w") as f:
        json.dump(config, f)
    with pytest.raises(errors.ClusterError, match=r"no context 'prod' \(contexts: dev\)"):
        cclient.connect(kubeconfig=path_, context="prod")
    cluster = cclient.connect(kubeconfig=path_)
    try:
        assert isinstance(cluster, Cluster)
        assert cluster.namespace == "ns1"
        assert cluster.server == "https://127.0.0.1:1"
    finally:
        cluster.close()
