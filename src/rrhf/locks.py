"""File locks that name their holder, and how long a run waits for a lock or for the other ranks of its launch.

A lock file holds one JSON line naming the process that holds it (host, pid, since when, launch and rank) while it
is held, and is emptied when released. A process that waits says at once what it waits for and who holds it, says
so again every few minutes, and gives up with that message after `RRHF_WAIT_TIMEOUT_S` seconds (default 6 hours:
the holder may be training the very artifact the waiter needs).

The kernel releases a `flock` when the last descriptor of the locked file closes, so a holder that dies frees its
lock at once, and the waiter proceeds (resuming the work the holder left in `<key>.partial/`). A lock still held
whose named holder has ended on this host is held by a process that inherited the descriptor (a child forked
while the lock was held); the waiter takes such a lock over after `TAKEOVER_AFTER_S`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from rrhf.launch import launch_id, rank

log = logging.getLogger(__name__)

WAIT_TIMEOUT_ENV, WAIT_TIMEOUT_DEFAULT_S = "RRHF_WAIT_TIMEOUT_S", 6 * 3600.0
# The same bound torch.distributed's collectives have under the Trainer (`trainer.args.ddp_timeout`, 1800 s).
PEER_TIMEOUT_ENV, PEER_TIMEOUT_DEFAULT_S = "RRHF_PEER_TIMEOUT_S", 1800.0
POLL_SECONDS = 0.5
LOG_EVERY_S = 300.0
# A new holder names itself right after it takes the lock; until then the file still names the previous one.
TAKEOVER_AFTER_S = 2.0


def seconds_from_env(name: str, default: float) -> float:
    """A time limit in seconds from the environment variable `name` (`inf`: no limit), else `default`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{name}={text!r}: expected a number of seconds > 0 (or inf for no limit)")
    return value


def lock_wait_limit() -> float:
    """How long a run waits for a lock held by another process before giving up."""
    return seconds_from_env(WAIT_TIMEOUT_ENV, WAIT_TIMEOUT_DEFAULT_S)


def peer_wait_limit() -> float:
    """How long a rank waits for the other ranks of its launch while nothing they write changes."""
    return seconds_from_env(PEER_TIMEOUT_ENV, PEER_TIMEOUT_DEFAULT_S)


def _process_start(pid: int) -> float | None:
    """When process `pid` started (None: no such process, or a zombie: it has ended)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:  # another user's process: alive, of unknown age
        return math.inf


def this_process() -> dict[str, Any]:
    """What a lock file says about its holder."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "started": _process_start(pid),
        "since": datetime.now().astimezone().isoformat(timespec="seconds"),
        "launch": launch_id(),
        "rank": rank(),
    }


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder a lock file names (None: none, or a file without a complete record)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return _parse(text)


def _parse(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and {"host", "pid", "since"} <= holder.keys() else None


def describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "a process that has not named itself yet"
    return f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"


def holder_ended(holder: dict[str, Any] | None) -> bool | None:
    """Whether the process a lock file names has ended: True or False on this host, None elsewhere (or unnamed).

    A pid alive with another start time is a new process that reuses the number: the holder has ended.
    """
    if holder is None or holder.get("host") != socket.gethostname():
        return None
    started = _process_start(int(holder["pid"]))
    if started is None:
        return True
    recorded = holder.get("started")
    return recorded is not None and started != math.inf and abs(started - float(recorded)) > 1.0


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a lock taken over is unlinked and made anew)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read(fd: int) -> dict[str, Any] | None:
    return _parse(os.pread(fd, 4096, 0).decode("utf-8", errors="replace"))


@contextmanager
def file_lock(path: Path, *, what: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) while the block runs.

    `what` says, in the messages, what the lock guards. Raises TimeoutError naming the holder once the wait
    passes `RRHF_WAIT_TIMEOUT_S`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, what or str(path))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(this_process()) + "\n").encode(), 0)
        yield
    finally:
        try:  # a free lock that named a holder would name one that is gone
            os.ftruncate(fd, 0)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire(path: Path, what: str) -> int:
    """An open descriptor of `path`, locked."""
    limit, started = lock_wait_limit(), time.monotonic()
    told: float | None = None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            ended_since: float | None = None
            while True:
                if _try_lock(fd):
                    if _same_file(fd, path):
                        previous = _read(fd)
                        if previous is not None:  # emptied on release: this holder died holding it
                            log.info(
                                "%s: took over %s from %s, which ended without releasing it",
                                what,
                                path,
                                describe(previous),
                            )
                        elif told is not None:
                            log.info("%s: got %s after %.0f s", what, path, time.monotonic() - started)
                        return fd
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    break  # taken over and made anew while we waited: lock the new file
                if not _same_file(fd, path):
                    break
                holder, waited = _read(fd), time.monotonic() - started
                if told is None or waited - told >= LOG_EVERY_S:
                    log.info(
                        "%s: waiting for %s held by %s%s",
                        what,
                        path,
                        describe(holder),
                        "" if told is None else f" ({waited / 60:.0f} min so far)",
                    )
                    told = waited
                if holder_ended(holder):
                    ended_since = ended_since if ended_since is not None else time.monotonic()
                    if time.monotonic() - ended_since >= TAKEOVER_AFTER_S:
                        _take_over(path, fd, holder, what)
                        break
                else:
                    ended_since = None
                if waited >= limit:
                    raise TimeoutError(_gave_up(path, what, holder, waited))
                time.sleep(POLL_SECONDS)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _take_over(path: Path, fd: int, holder: dict[str, Any] | None, what: str) -> None:
    """Unlink a lock file whose named holder has ended but whose lock a process that inherited it still holds,
    so that the next open makes a new one. Waiters serialise on a guard file and look again under it: two of
    them must not each unlink the file the other has just made and locked."""
    with open(path.parent / ".lock-takeover", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if _same_file(fd, path) and _read(fd) == holder and holder_ended(holder) and not _try_lock(fd):
            log.warning(
                "%s: taking over %s: it names %s, which has ended, but a process it started still holds the lock",
                what,
                path,
                describe(holder),
            )
            path.unlink()


def _gave_up(path: Path, what: str, holder: dict[str, Any] | None, waited: float) -> str:
    ended = holder_ended(holder)
    state = {None: "on another host or unnamed: look there", False: "still running"}.get(ended, "ended")
    return (
        f"{what}: gave up after {waited:.0f} s waiting for {path}, held by {describe(holder)} ({state}). "
        f"A run that holds it may be building what this one needs: wait for it, or end it (its partial work is "
        f"resumed by the next run). {WAIT_TIMEOUT_ENV} sets how long to wait (now {lock_wait_limit():g} s)"
    )
