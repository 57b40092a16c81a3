"""The state directory and ``state.json``: liveness by pid and start time, every malformed file
reported with a way out, root-owned state after ``sudo`` and symbolic links refused (issue 11)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import users
from tpconf import cli
from tpconf.errors import TpconfError
from tpconf.pids import ProcessId
from tpconf.reconcile.state import (
    STATE_FILE,
    DeploymentRow,
    Snapshot,
    check_dir,
    read,
    write,
)

pytestmark = pytest.mark.timeout(30)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: acts as another user")

ROW = DeploymentRow(name="web", namespace="dev", method="inject-tcp", operation="new")


def snapshot(pid: int | None = None) -> Snapshot:
    return Snapshot(
        pid=pid or os.getpid(), session="s1", config="c", started=1.0, deployments=(ROW,)
    )


def test_a_snapshot_names_its_writer_by_start_time_and_is_alive_while_it_runs(
    tmp_path: Path,
) -> None:
    write(tmp_path, snapshot())
    found = read(tmp_path)
    assert found is not None
    assert found.process == ProcessId.own()
    assert found.alive
    assert found.deployments == (ROW,)


def test_a_reused_pid_is_not_a_running_up(tmp_path: Path) -> None:
    """The pid of a crashed `up` now runs something else: status must not say "running"."""
    write(tmp_path, snapshot())
    data = json.loads((tmp_path / STATE_FILE).read_text())
    data["pid_start"] -= 1  # the `up` that wrote it started earlier: this process reused its pid
    (tmp_path / STATE_FILE).write_text(json.dumps(data))
    found = read(tmp_path)
    assert found is not None and not found.alive


def test_an_older_file_without_start_time_is_alive_only_if_its_pid_runs_tpconf(
    tmp_path: Path,
) -> None:
    other = subprocess.Popen(["sleep", "30"])
    try:
        data = json.loads(snapshot(other.pid).to_json())
        for key in ("pid_start", "boot"):
            del data[key]
        (tmp_path / STATE_FILE).write_text(json.dumps(data))
        found = read(tmp_path)
        assert found is not None and found.pid == other.pid
        assert not found.alive  # `sleep`, not a tpconf
    finally:
        other.kill()
        other.wait()


def test_fields_a_newer_tpconf_added_are_ignored(tmp_path: Path) -> None:
    data = json.loads(snapshot().to_json())
    data["future"] = {"x": 1}
    data["deployments"][0]["future"] = 2
    (tmp_path / STATE_FILE).write_text(json.dumps(data))
    found = read(tmp_path)
    assert found is not None and found.deployments == (ROW,)


def _valid() -> dict[str, object]:
    return json.loads(snapshot().to_json())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "Expecting value"),
        ('{"pid": 12', "Expecting"),
        ("[1, 2]", "expected a JSON object"),
        ({"session": "s", "config": "c", "started": 0}, "`pid` is missing"),
        ({**_valid(), "pid": "12a"}, '`pid` has the wrong type: "12a"'),
        ({**_valid(), "pid": -4}, "`pid` must be a positive whole number, not -4"),
        ({**_valid(), "pid": True}, "`pid` has the wrong type: true"),
        ({**_valid(), "pid": 1.5}, "`pid` has the wrong type: 1.5"),
        ({**_valid(), "started": "yesterday"}, '`started` has the wrong type: "yesterday"'),
        ({**_valid(), "deployments": {"web": {}}}, "`deployments` must be a list"),
        ({**_valid(), "deployments": [7]}, "`deployments[0]` must be a JSON object"),
        ({**_valid(), "deployments": [{"name": "web"}]}, "`deployments[0].namespace` is missing"),
        (
            {**_valid(), "deployments": [{**json.loads(json.dumps(ROW.__dict__)), "exposes": [1]}]},
            "`deployments[0].exposes` must be a list of strings",
        ),
    ],
)
def test_every_malformed_state_file_says_what_is_wrong_and_how_to_go_on(
    tmp_path: Path, content: str | dict[str, object], problem: str
) -> None:
    path = tmp_path / STATE_FILE
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(TpconfError) as info:
        read(tmp_path)
    assert info.value.message.startswith(f"{path} is not a state file of tpconf: ")
    assert problem in info.value.message
    assert info.value.hint == (
        "it only records what a `tpconf up` ran: `tpconf down` cleans up without it (and "
        f"removes it), or remove it yourself (`rm {path}`)"
    )


def test_a_missing_state_file_means_no_up_ran_here(tmp_path: Path) -> None:
    assert read(tmp_path / "nothing") is None


def test_a_symlinked_state_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / ".tpconf"
    link.symlink_to(elsewhere)
    with pytest.raises(TpconfError, match="is a symbolic link") as info:
        check_dir(link)
    assert info.value.hint == f"remove the link (`rm {link}`); tpconf makes the directory itself"
    (tmp_path / "file").write_text("")
    with pytest.raises(TpconfError, match="is not a directory"):
        check_dir(tmp_path / "file")
    check_dir(tmp_path / "missing")  # made on first use
    check_dir(elsewhere)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    with users.shared_dir("tpconf-state-") as path:
        yield path


SHOW = """
import sys
from pathlib import Path
from tpconf.errors import TpconfError
from tpconf.reconcile.state import check_dir, read
try:
    check_dir(Path(sys.argv[1]))
    read(Path(sys.argv[1]))
except TpconfError as exc:
    print(exc.render())
else:
    print("no error")
"""


@pytest.mark.root
@needs_root
def test_state_a_sudo_up_left_gets_a_hint_to_use_sudo_or_chown(shared_dir: Path) -> None:
    state_dir = shared_dir / ".tpconf"
    write(state_dir, snapshot())  # as root: what `sudo tpconf up` leaves
    shown = users.as_nobody(SHOW, str(state_dir))
    assert shown == (
        f"{state_dir} belongs to root: a `sudo tpconf up` made it\n"
        "  hint: run tpconf with sudo here too (`sudo -E tpconf down` cleans up), or give it "
        f"back: `sudo chown -R nobody {state_dir}`"
    )
    # Only the file root-owned (the directory given back, the file not): still named.
    os.chown(state_dir, 65534, 65534)
    shown = users.as_nobody(SHOW, str(state_dir))
    assert shown.startswith(f"{state_dir / STATE_FILE} is readable only by root: a `sudo tpconf")
    # Root may use any user's directory.
    check_dir(state_dir)


def test_status_names_a_malformed_state_file_and_the_way_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    config = tmp_path / "telepresence.yaml"
    config.write_text("version: 1\ndeployments:\n  web:\n    new: true\n")
    (tmp_path / ".tpconf").mkdir()
    (tmp_path / ".tpconf" / STATE_FILE).write_text('{"pid": "4x2", "session": "s"}')
    assert cli.main(["status", "-f", str(config)]) == 1
    _, err = capsys.readouterr()
    state = tmp_path / ".tpconf" / STATE_FILE
    assert err == (
        f'{state} is not a state file of tpconf: `pid` has the wrong type: "4x2"\n'
        "  hint: it only records what a `tpconf up` ran: `tpconf down` cleans up without it "
        f"(and removes it), or remove it yourself (`rm {state}`)\n"
    )
    assert "bug" not in err
