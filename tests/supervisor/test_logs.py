"""LogFiles and `tpconf logs`' readers: per-deployment files, bounded in size, read back in time
order, followed across a rotation until up ends (issue 13, item 6)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tpconf.supervisor.output import LogFiles, follow_logs, read_logs


def test_lines_and_notices_are_kept_per_deployment_and_read_back_interleaved(
    tmp_path: Path,
) -> None:
    logs = LogFiles(tmp_path / "logs")
    logs.clear()
    logs.write("api", "listening")
    logs.write("web", "oops", stream="stderr")
    logs.notice("api", "exited with code 1\n(and a second line)")
    logs.close()
    records = read_logs(tmp_path / "logs")
    assert [(r.name, r.stream, r.text) for r in records] == [
        ("api", "stdout", "listening"),
        ("web", "stderr", "oops"),
        ("api", "notice", "exited with code 1"),
        ("api", "notice", "(and a second line)"),
    ]
    assert [r.text for r in read_logs(tmp_path / "logs", ["web"])] == ["oops"]
    assert [r.text for r in read_logs(tmp_path / "logs", tail=1)] == ["oops", "(and a second line)"]
    assert (tmp_path / "logs" / "api.log").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "logs").stat().st_mode & 0o777 == 0o700


def test_a_deployment_keeps_at_most_two_files_of_the_bound(tmp_path: Path) -> None:
    logs = LogFiles(tmp_path, max_bytes=1000)
    for number in range(200):
        logs.write("api", f"line {number:03d}")
    logs.close()
    sizes = [p.stat().st_size for p in sorted(tmp_path.glob("api.log*"))]
    assert len(sizes) == 2 and all(size <= 1000 for size in sizes)
    texts = [r.text for r in read_logs(tmp_path)]
    assert texts[-1] == "line 199"
    assert texts == sorted(texts)  # the rotated file first, then the current one
    assert len(texts) < 200  # the oldest lines are gone


def test_a_new_up_starts_without_the_old_logs(tmp_path: Path) -> None:
    old = LogFiles(tmp_path)
    old.write("api", "old")
    old.close()
    LogFiles(tmp_path).clear()
    assert read_logs(tmp_path) == []


def test_follow_gives_new_lines_across_a_rotation_until_up_ends(tmp_path: Path) -> None:
    logs = LogFiles(tmp_path, max_bytes=400)  # api's file is rotated once meanwhile
    logs.write("api", "before")
    running = threading.Event()
    running.set()

    def write_more() -> None:
        time.sleep(0.3)
        for number in range(20):
            logs.write("api", f"after {number:02d}")
            logs.write("web", f"web {number:02d}")
            time.sleep(0.01)
        time.sleep(0.3)
        running.clear()  # up ends

    writer = threading.Thread(target=write_more)
    writer.start()
    got = [r.text for r in follow_logs(tmp_path, tail=0, running=running.is_set, interval=0.05)]
    writer.join()
    logs.close()
    assert len(list(tmp_path.glob("api.log*"))) == 2
    assert [t for t in got if t.startswith("after")] == [f"after {n:02d}" for n in range(20)]
    assert [t for t in got if t.startswith("web")] == [f"web {n:02d}" for n in range(20)]
    assert "before" not in got
