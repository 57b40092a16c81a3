"""pod_state: what a pod's JSON says about the agent (pure), and log redaction."""

from __future__ import annotations

from typing import Any

from tpconf.cluster import pods
from tpconf.errors import explain


def pod(
    *,
    phase: str = "Pending",
    conditions: list[dict[str, Any]] | None = None,
    statuses: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": "web-1"},
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": statuses or [],
        },
    }


def status(state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "agent", "image": "tpconf/agent:0.1.0", "ready": False, "state": state, **extra}


def test_a_new_pod_is_pending_then_creating_then_running_then_ready() -> None:
    assert pods.pod_state(pod(), "agent").text == "Pending (scheduling)"
    scheduled = [{"type": "PodScheduled", "status": "True"}]
    assert pods.pod_state(pod(conditions=scheduled), "agent").text == "ContainerCreating"
    creating = status({"waiting": {"reason": "ContainerCreating"}})
    assert pods.pod_state(pod(statuses=[creating]), "agent").text == "ContainerCreating"
    running = status({"running": {"startedAt": "now"}})
    state = pods.pod_state(pod(phase="Running", statuses=[running]), "agent")
    assert (state.kind, state.text) == ("progress", "Running, not Ready yet")
    ready = status({"running": {}}, ready=True)
    cond = [{"type": "Ready", "status": "True"}]
    assert (
        pods.pod_state(pod(phase="Running", conditions=cond, statuses=[ready]), "agent").kind
        == "ready"
    )


def test_an_image_pull_error_names_the_image() -> None:
    waiting = status(
        {"waiting": {"reason": "ErrImagePull", "message": "not found"}}, image="nope:1"
    )
    state = pods.pod_state(pod(statuses=[waiting]), "agent")
    assert (state.kind, state.image) == ("image", "nope:1")
    err = pods.image_failure(state, pod="web-1")
    assert "nope:1" in err.message
    assert err.hint is not None and "`agent-image`" in err.hint
    # Issue 13: an image on its way into the node is retried with back-off, not given up on.
    assert explain(err).transient


def test_an_invalid_image_name_is_not_retried() -> None:
    waiting = status({"waiting": {"reason": "InvalidImageName", "message": "bad"}}, image="x@")
    err = pods.image_failure(pods.pod_state(pod(statuses=[waiting]), "agent"), pod="web-1")
    assert not explain(err).transient


def test_an_evicted_pod_is_retried_and_a_failed_one_is_not() -> None:
    evicted = {"status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory"}}
    err = pods.stop_failure(pods.pod_state(evicted, "agent"), pod="web-1", namespace="dev")
    assert err.message == 'pod "web-1" stopped: Evicted: low on memory'
    assert explain(err).transient
    failed = {"status": {"phase": "Failed", "reason": "Error", "message": "exit 1"}}
    err = pods.stop_failure(pods.pod_state(failed, "agent"), pod="web-1", namespace="dev")
    assert not explain(err).transient


def test_unschedulable_carries_the_scheduler_message() -> None:
    cond = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient memory.",
        }
    ]
    state = pods.pod_state(pod(conditions=cond), "agent")
    assert state.kind == "unschedulable"
    assert "Insufficient memory" in state.text


def test_a_crash_loop_reports_the_exit_code() -> None:
    crashing = status(
        {"waiting": {"reason": "CrashLoopBackOff"}},
        lastState={"terminated": {"exitCode": 3}},
        restartCount=2,
    )
    state = pods.pod_state(pod(phase="Running", statuses=[crashing]), "agent")
    assert (state.kind, state.exit_code) == ("crash", 3)
    assert state.text == "CrashLoopBackOff (exit code 3)"


def test_a_crash_of_another_container_is_not_the_agents() -> None:
    other = {
        "name": "sidecar",
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1}},
        "restartCount": 3,
    }
    assert pods.pod_state(pod(phase="Running", statuses=[other]), "agent").kind == "progress"


def test_replica_failure_is_read_from_the_deployment() -> None:
    dep = {
        "status": {
            "conditions": [
                {
                    "type": "ReplicaFailure",
                    "status": "True",
                    "message": 'pods "x" is forbidden: violates PodSecurity "restricted:latest"',
                }
            ]
        }
    }
    assert (
        pods.replica_failure(dep)
        == 'pods "x" is forbidden: violates PodSecurity "restricted:latest"'
    )
    assert pods.replica_failure({"status": {}}) is None


def test_key_material_is_redacted_from_log_lines() -> None:
    text = (
        "starting\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
        "-----END OPENSSH PRIVATE KEY-----\nkey ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl done"
    )
    out = pods.redact(text)
    assert "PRIVATE KEY" not in out
    assert "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl" not in out
    assert out.startswith("starting\n[redacted]")


def test_log_tail_keeps_the_end_where_the_error_is() -> None:
    text = "\n".join(f"line {i}" for i in range(100)) + "\nPermissionError: denied"
    out = pods.log_tail(text, limit=60)
    assert out.startswith("…line")
    assert out.endswith("PermissionError: denied")
    assert len(out) <= 61
    assert pods.log_tail("short") == "short"
