"""Nothing waits for good: a lock names its holder and has a time limit, a lock whose holder has ended is taken over,
a rank stops waiting for a peer that has ended or shows no progress, and a rank ends with its launcher.
(The same through torchrun: tests/test_distributed.py.)"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rrhf import locks, sharding
from rrhf.locks import file_lock, read_holder
from rrhf.sharding import rank_lock, wait_for

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE, text=True, **kwargs
    )


def _ended_pid() -> int:
    """The pid of a process that has ended (and been waited for)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_a_waiter_says_who_holds_the_lock_and_gets_it_once_released(tmp_path: Path, caplog) -> None:
    path, got = tmp_path / "a.lock", []
    with file_lock(path):
        holder = read_holder(path)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()

        def wait() -> None:
            with file_lock(path, what="train abc"):
                got.append(time.monotonic())

        waiter = threading.Thread(target=wait)
        with caplog.at_level(logging.INFO, logger="rrhf.locks"):
            waiter.start()
            time.sleep(0.3)
            assert not got
            told = [r.getMessage() for r in caplog.records]
    waiter.join(5)
    assert got, "the waiter did not get the released lock"
    assert told == [
        f"train abc: waiting for {path} held by pid {os.getpid()} on host {socket.gethostname()} "
        f"since {holder['since']}"
    ]


def test_a_released_lock_names_nobody(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    with file_lock(path):
        assert json.loads(path.read_text())["since"]
    assert path.read_text() == "" and read_holder(path) is None


def test_the_wait_gives_up_after_the_limit_naming_the_holder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RRHF_WAIT_TIMEOUT_S", "1")
    path = tmp_path / "a.lock"
    started = time.monotonic()
    with file_lock(path), pytest.raises(TimeoutError) as error:
        with file_lock(path, what="sample abc"):
            pass
    assert 1 <= time.monotonic() - started < 3
    message = str(error.value)
    assert message.startswith(
        f"sample abc: gave up after 1 s waiting for {path}, held by pid {os.getpid()} on host "
        f"{socket.gethostname()} since "
    )
    assert "(still running)" in message and "RRHF_WAIT_TIMEOUT_S sets how long to wait (now 1 s)" in message


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_a_bad_wait_limit_is_refused(value: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RRHF_WAIT_TIMEOUT_S", value)
    with pytest.raises(ValueError, match=rf"RRHF_WAIT_TIMEOUT_S='{value}': expected a number of seconds > 0"):
        with file_lock(tmp_path / "a.lock"):
            pass


def test_a_lock_whose_holder_was_killed_is_free_at_once(tmp_path: Path, caplog) -> None:
    path = tmp_path / "a.lock"
    holder = _python(f"""
        import os, time
        from rrhf.locks import file_lock
        with file_lock({str(path)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)
    try:
        assert holder.stdout.readline() == "held\n"
        holder.kill()
        holder.wait()
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="rrhf.locks"), file_lock(path, what="score abc"):
            assert time.monotonic() - started < 1  # the kernel released it with the process
    finally:
        holder.kill()
    assert any(
        f"took over {path} from pid {holder.pid} on host" in r.getMessage()
        and "which ended without releasing it" in r.getMessage()
        for r in caplog.records
    )


def test_a_lock_whose_holder_ended_but_a_child_holds_is_taken_over(tmp_path: Path, caplog) -> None:
    """The named holder has ended; a child it forked while holding the lock keeps the lock itself held."""
    path = tmp_path / "a.lock"
    holder = _python(f"""
        import os, time
        from rrhf.locks import file_lock
        with file_lock({str(path)!r}):
            child = os.fork()
            if child == 0:
                time.sleep(60)
                os._exit(0)
            print(child, flush=True)
            os._exit(0)
    """)
    child = int(holder.stdout.readline())
    try:
        holder.wait()
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="rrhf.locks"), file_lock(path, what="evaluate abc"):
            took = time.monotonic() - started
            assert read_holder(path)["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)
    assert locks.TAKEOVER_AFTER_S <= took < locks.TAKEOVER_AFTER_S + 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"taking over {path}: it names pid {holder.pid} on host" in warned[0]


def _as_rank(monkeypatch, r: int, world: int = 2) -> None:
    monkeypatch.setenv("RANK", str(r))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RRHF_LAUNCH_ID", "test-launch")


def test_a_rank_stops_waiting_for_a_peer_whose_process_has_ended(tmp_path: Path, monkeypatch) -> None:
    _as_rank(monkeypatch, 0)
    monkeypatch.setattr(sharding, "PEER_CHECK_SECONDS", 0.1)
    work = tmp_path / "sample" / "abc.partial"
    work.mkdir(parents=True)
    dead = {
        "host": socket.gethostname(),
        "pid": _ended_pid(),
        "started": 0.0,
        "since": "2026-01-01T00:00:00+00:00",
        "launch": "test-launch",
        "rank": 1,
    }
    rank_lock(work, 1).write_text(json.dumps(dead))
    with pytest.raises(
        RuntimeError,
        match=rf"sampling: rank 1 \(pid {dead['pid']} on host .* since 2026-01-01T00:00"
        r":00\+00:00\) has ended before finishing its part",
    ):
        wait_for(work, ["sample.done-1-of-2.test-launch"], what="sampling")
    # A lock of an earlier launch says nothing about this launch's rank 1.
    rank_lock(work, 1).write_text(json.dumps(dead | {"launch": "earlier"}))
    (work / "sample.done-1-of-2.test-launch").touch()
    wait_for(work, ["sample.done-1-of-2.test-launch"], what="sampling")


def test_a_rank_gives_up_on_peers_that_show_no_progress(tmp_path: Path, monkeypatch) -> None:
    _as_rank(monkeypatch, 0)
    monkeypatch.setattr(sharding, "PEER_CHECK_SECONDS", 0.1)
    monkeypatch.setenv("RRHF_PEER_TIMEOUT_S", "0.5")
    work = tmp_path / "abc.partial"
    work.mkdir()

    def progress() -> None:  # a peer that appends to its shard for a second, then stops
        for i in range(10):
            (work / "s.shard-1-of-2.jsonl").write_text("x\n" * i)
            time.sleep(0.1)

    peer = threading.Thread(target=progress)
    started = time.monotonic()
    peer.start()
    with pytest.raises(
        TimeoutError,
        match=r"sampling: nothing in .*abc.partial has changed for \d s: another rank "
        r"is lost or stuck. RRHF_PEER_TIMEOUT_S sets this limit \(now 0.5 s\)",
    ):
        wait_for(work, ["never"], what="sampling")
    peer.join()
    assert 1.4 <= time.monotonic() - started < 4  # progress kept it waiting, silence did not


LAUNCHED = """
    import os, sys, time
    from rrhf.launch import end_with_launcher
    {platform}
    print(end_with_launcher(), os.getpid(), flush=True)
    time.sleep(60)
"""
LAUNCHER = """
    import subprocess, sys, time
    rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout)
    time.sleep(60)
"""


@pytest.mark.parametrize("how", ["death signal", "watching thread"])
def test_a_rank_ends_with_its_launcher(how: str) -> None:
    """A torchrun worker (TORCHELASTIC_RUN_ID set) ends when its launcher is SIGKILLed: by the kernel's parent-death
    signal on Linux, or by the thread that watches the parent elsewhere."""
    platform = "sys.platform = 'elsewhere'  # no prctl" if how == "watching thread" else ""
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(LAUNCHER), textwrap.dedent(LAUNCHED.format(platform=platform))],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    watching, pid = launcher.stdout.readline().split()
    try:
        assert watching == "True"
        launcher.kill()
        launcher.wait()
        killed = time.monotonic()
        while not _gone(int(pid)) and time.monotonic() - killed < 10:
            time.sleep(0.02)
        lived = time.monotonic() - killed
    finally:
        if not _gone(int(pid)):
            os.kill(int(pid), signal.SIGKILL)
    assert lived < (0.5 if how == "death signal" else 2.0)


def test_a_plain_run_does_not_watch_its_parent() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    code = "from rrhf.launch import end_with_launcher; print(end_with_launcher())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.stdout == "False\n"
