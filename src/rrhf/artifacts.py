"""Content-addressed, atomic, resumable stage artifacts.

Every stage writes into `<root>/<stage>/<key>/`, where the key is a hash of exactly the inputs that
determine the artifact. Work happens in `<key>.partial/` (kept across crashes, so a stage may resume
from what it finished), a `DONE` marker is written last, and the folder is renamed into place: a
folder without `DONE` is never taken for a finished one. A file lock serialises two runs that need the
same artifact at the same time; the second one finds it finished and skips.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def digest(inputs: Any) -> str:
    """A short stable hash of a JSON-serialisable description of a stage's inputs."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def atomic_dir(target: Path, *, keep_partial: bool = False) -> Iterator[Path]:
    """Yield a work folder that becomes `target` (with a DONE marker) only if the block completes.

    With keep_partial the work folder survives a failure, so a rerun can resume from its contents.
    """
    target = Path(target)
    work = target.with_name(target.name + ".partial")
    with file_lock(target.with_name(target.name + ".lock")):
        if (target / "DONE").exists():
            yield target
            return
        if target.exists():  # an old folder without DONE: never trust it
            shutil.rmtree(target)
        if work.exists() and not keep_partial:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        try:
            yield work
        except BaseException:
            if not keep_partial:
                shutil.rmtree(work, ignore_errors=True)
            raise
        (work / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        os.replace(work, target)


def run_stage(root: Path, stage: str, inputs: dict, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return the finished artifact folder of `stage` for `inputs`, building it with `build(work)` if needed.

    The second value says whether work was done. `build` may find files of an interrupted earlier
    attempt in its folder and continue from them.
    """
    target = Path(root) / stage / digest(inputs)
    if (target / "DONE").exists():
        log.info("%s: cached at %s", stage, target)
        return target, False
    with atomic_dir(target, keep_partial=True) as work:
        if work == target:  # finished by a concurrent run while we waited for the lock
            return target, False
        (work / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str))
        log.info("%s: building %s", stage, target)
        build(work)
    return target, True


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
