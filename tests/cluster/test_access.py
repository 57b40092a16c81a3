"""RBAC rules as a SelfSubjectRulesReview returns them, matched the way RBAC matches them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tpconf.cluster.access import ACCESS, granted, required_access

REPO = Path(__file__).resolve().parents[2]


def _rule(verbs: list[str], groups: list[str], resources: list[str], **more: Any) -> dict[str, Any]:
    return {"verbs": verbs, "apiGroups": groups, "resources": resources, **more}


ADMIN = [_rule(["*"], ["*"], ["*"])]


@pytest.mark.parametrize(
    ("rules", "triple", "allowed"),
    [
        (ADMIN, ("create", "", "pods/portforward"), True),
        ([_rule(["get", "list"], [""], ["pods"])], ("list", "", "pods"), True),
        ([_rule(["get", "list"], [""], ["pods"])], ("watch", "", "pods"), False),
        # The group must match: core pods are not apps pods.
        ([_rule(["get"], ["apps"], ["pods"])], ("get", "", "pods"), False),
        ([_rule(["get"], ["*"], ["deployments"])], ("get", "apps", "deployments"), True),
        # A resource does not grant its subresources, nor a subresource its resource.
        ([_rule(["create"], [""], ["pods"])], ("create", "", "pods/portforward"), False),
        ([_rule(["get"], [""], ["pods/log"])], ("get", "", "pods"), False),
        ([_rule(["create"], [""], ["*/portforward"])], ("create", "", "pods/portforward"), True),
        ([_rule(["patch"], ["apps"], ["*/scale"])], ("patch", "apps", "deployments/scale"), True),
        # A rule for named objects only says nothing about tpconf's own objects.
        (
            [_rule(["delete"], [""], ["secrets"], resourceNames=["db-password"])],
            ("delete", "", "secrets"),
            False,
        ),
        ([], ("get", "", "pods"), False),
        # Non-resource rules and malformed entries are not resource grants.
        ([{"verbs": ["get"], "nonResourceURLs": ["/healthz"]}], ("get", "", "pods"), False),
    ],
)
def test_rules_are_matched_as_rbac_matches_them(
    rules: list[dict[str, Any]], triple: tuple[str, str, str], allowed: bool
) -> None:
    assert granted(rules, *triple) is allowed


def test_the_documented_role_grants_what_every_operation_needs() -> None:
    # A SelfSubjectRulesReview of a user bound to docs/rbac.yaml's Role returns its rules.
    role = next(yaml.safe_load_all((REPO / "docs/rbac.yaml").read_text()))
    for triple in required_access(op for op in ACCESS if op is not None):
        assert granted(role["rules"], *triple), triple
