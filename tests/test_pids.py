"""tpconf.pids with real processes: identities that survive pid reuse, children that die with
their parent even on SIGKILL, and the record `tpconf down` stops leftover process groups from."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.orphans import killed_parent, survivors
from tests.supervisor.procs import alive
from tpconf.pids import Child, ProcessId, group_members, read_record, stop_leftovers

pytestmark = pytest.mark.timeout(60)

# Starts `sh -c SCRIPT` through open_child (its own group, recorded in RECORD); prints the pids
# of sh and of the job sh started in the background.
PARENT = """
import anyio, json, sys
from pathlib import Path
from tpconf.pids import open_child, recording

async def main():
    record, script = Path(sys.argv[1]), sys.argv[2]
    with recording(record):
        child = await open_child(["sh", "-c", script], stdin=None, start_new_session=True)
        job = int(await child.stdout.receive())
        print(json.dumps([child.pid, job]), flush=True)
        await anyio.sleep(300)

anyio.run(main)
"""


@pytest.fixture
def left(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """(the record, sh's pid, its background job's pid) after their parent died by SIGKILL."""
    record = tmp_path / "children.json"
    with killed_parent(PARENT, str(record), "sleep 300 & echo $!; wait") as (leader, job):
        yield record, leader, job


def test_a_process_is_alive_only_with_its_own_start_time() -> None:
    me = ProcessId.own()
    assert me.alive()
    assert not ProcessId(me.pid, me.start + 1, me.boot).alive()  # the pid, reused by another
    assert not ProcessId(me.pid, me.start, "another boot").alive()
    done = subprocess.Popen(["true"])
    done.wait()
    assert ProcessId.of(done.pid) is None


def test_a_child_dies_with_its_parent_even_on_sigkill(left: tuple[Path, int, int]) -> None:
    _, leader, _ = left
    assert survivors([leader]) == [], "the child outlived its SIGKILLed parent"


def test_the_janitor_stops_the_childs_whole_group_when_the_parent_is_killed(
    left: tuple[Path, int, int],
) -> None:
    """The death signal reaches only the direct child (sh); the janitor stops what sh started."""
    record, leader, job = left
    assert survivors([leader, job]) == []
    for _ in range(100):
        if not record.exists():
            break
        time.sleep(0.05)
    assert not record.exists()


def test_down_stops_what_the_janitor_could_not_and_forgets_the_record(tmp_path: Path) -> None:
    record = tmp_path / "children.json"

    def kill_janitor_first() -> None:
        found = subprocess.run(
            ["pgrep", "-f", f"tpconf.pids janitor {record}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        assert len(found) == 1, found
        os.kill(int(found[0]), signal.SIGKILL)  # an OOM kill of the janitor too, say

    with killed_parent(
        PARENT, str(record), "sleep 300 & echo $!; wait", before_kill=kill_janitor_first
    ) as (leader, job):
        assert survivors([leader]) == []
        # Without the janitor, the death signal reaches only the direct child.
        assert alive(job)
        found = read_record(record)
        assert found.owner is not None and not found.owner.alive()  # the killed parent
        (child,) = found.children
        assert child.id.pid == leader and child.what == "sh"
        assert child.members() == [job]
        assert stop_leftovers(record) == [f"stopped process group {leader} (sh) left by tpconf up"]
        assert survivors([job]) == []
        assert not record.exists()
        assert stop_leftovers(record) == []  # nothing recorded: nothing to do


def test_a_recorded_group_whose_pid_now_belongs_to_another_process_is_left_alone(
    tmp_path: Path,
) -> None:
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        now = ProcessId.of(stranger.pid)
        assert now is not None
        # What a record says of a tpconf child that had this pid before.
        earlier = ProcessId(stranger.pid, now.start - 1, now.boot)
        record = tmp_path / "children.json"
        gone = {**ProcessId.own().to_dict(), "start": 0}
        children = [{**earlier.to_dict(), "what": "kubectl"}]
        record.write_text(json.dumps({"owner": gone, "children": children}))
        assert Child(earlier, "kubectl").members() == []
        assert not Child(earlier, "kubectl").may_have_members()
        assert stop_leftovers(record) == []
        time.sleep(0.2)
        assert alive(stranger.pid)
        assert group_members(stranger.pid) == [stranger.pid]
    finally:
        stranger.kill()
        stranger.wait()


def test_the_children_of_a_running_up_are_left_alone(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        found = ProcessId.of(child.pid)
        assert found is not None
        record = tmp_path / "children.json"
        children = [{**found.to_dict(), "what": "sleep"}]
        record.write_text(json.dumps({"owner": ProcessId.own().to_dict(), "children": children}))
        assert stop_leftovers(record) == []  # its `up` (this process) still runs
        assert alive(child.pid) and record.exists()
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "Expecting property name"),
        ("[]", "expected an object with `owner` and a list of `children`"),
        ('{"children": []}', "`owner` must be an object"),
        ('{"owner": {"pid": 0}, "children": []}', "owner: `pid` must be a positive whole number"),
        ('{"owner": {"pid": 1}, "children": [{"pid": "12a"}]}', "child 0: `pid` must be a positive whole number, not '12a'"),
        ('{"owner": {"pid": 1}, "children": [{"pid": 5, "start": -1}]}', "child 0: `start` must be a whole number, not -1"),
        ('{"owner": {"pid": 1}, "children": [3]}', "child 0: expected an object"),
    ],
)  # fmt: skip
def test_a_malformed_record_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    record = tmp_path / "children.json"
    record.write_text(text)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        read_record(record)


def test_a_group_may_have_members_while_it_exists_and_not_after() -> None:
    leader = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        own = ProcessId.of(leader.pid)
        assert own is not None
        child = Child(own, "sleep")
        assert child.may_have_members() and child.members() == [leader.pid]
    finally:
        leader.kill()
        leader.wait()
    assert not child.may_have_members()
    assert child.members() == []
