"""Content-addressed, atomic, resumable stage artifacts.

Every stage writes into `<root>/<stage>/<key>/`, where the key is a hash of exactly the inputs that
determine the artifact. Work happens in `<key>.partial/` (kept across crashes, so a stage may resume
from what it finished), a `DONE` marker is written last, and the folder is renamed into place: a
folder without `DONE` is never taken for a finished one. A file lock serialises two runs that need the
same artifact at the same time; the second one finds it finished and skips (`rrhf.locks`: the waiter says who
holds the lock, and gives up after a time limit).
"""

from __future__ import annotations

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

from rrhf.data import strict_json
from rrhf.launch import launch_id, rank, world_size
from rrhf.locks import file_lock
from rrhf.sharding import clean as clean_shards
from rrhf.sharding import mark_failed, rank_lock, wait_for

log = logging.getLogger(__name__)


def digest(inputs: Any) -> str:
    """A short stable hash of a JSON-serialisable description of a stage's inputs."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def atomic_dir(target: Path, *, keep_partial: bool = False) -> Iterator[Path]:
    """Yield a work folder that becomes `target` (with a DONE marker) only if the block completes.

    With keep_partial the work folder survives a failure, so a rerun can resume from its contents.
    """
    target = Path(target)
    work = target.with_name(target.name + ".partial")
    with file_lock(target.with_name(target.name + ".lock"), what=f"{target.parent.name} {target.name}"):
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


def run_stage(
    root: Path,
    stage: str,
    inputs: dict,
    build: Callable[[Path], None],
    *,
    all_ranks: bool = False,
    resume_state: str | None = None,
) -> tuple[Path, bool]:
    """Return the finished artifact folder of `stage` for `inputs`, building it with `build(work)` if needed.

    The second value says whether work was done. `build` may find files of an interrupted earlier attempt in
    its folder and continue from them. With all_ranks, every rank of a multi-rank launch runs `build` in the
    same work folder (dividing the work: `rrhf.sharding`, or a collective training), and rank 0 completes the
    folder once every rank has finished; one process builds the same way, under the lock below.

    `resume_state` names the subfolder where `build` keeps what only an unfinished attempt needs (training
    checkpoints with their optimiser state); it is deleted once the artifact is complete, and from a finished
    artifact that still has it. AdamW's moments are twice the size of the weights, so a finished 7B training
    would otherwise keep about 84 GB it never reads again, and a sweep of them fills the disk.
    """
    target, built = _find_or_build(root, stage, inputs, build, all_ranks)
    if resume_state is not None and rank() == 0 and (target / resume_state).exists():
        shutil.rmtree(target / resume_state, ignore_errors=True)  # a concurrent run may be deleting it too
    return target, built


def _find_or_build(
    root: Path, stage: str, inputs: dict, build: Callable[[Path], None], all_ranks: bool
) -> tuple[Path, bool]:
    target = Path(root) / stage / digest(inputs)
    if (target / "DONE").exists():
        log.info("%s: cached at %s", stage, target)
        return target, False
    if all_ranks and world_size() > 1:
        return _run_on_every_rank(target, stage, inputs, build)
    with atomic_dir(target, keep_partial=True) as work:
        if work == target:  # finished by a concurrent run while we waited for the lock
            return target, False
        (work / "inputs.json").write_text(strict_json(inputs, "inputs.json", indent=2, sort_keys=True, default=str))
        log.info("%s: building %s", stage, target)
        build(work)
        clean_shards(work)
    return target, True


def _run_on_every_rank(target: Path, stage: str, inputs: dict, build: Callable[[Path], None]) -> tuple[Path, bool]:
    # Rank r holds lock r until the artifact is whole: a second launch that needs the same artifact waits
    # rank by rank and then finds it finished, instead of joining a build half-way.
    me, world, launch = rank(), world_size(), launch_id()
    work = target.with_name(target.name + ".partial")
    with file_lock(rank_lock(work, me), what=f"{stage} {target.name} (rank {me})"):
        if (target / "DONE").exists():
            return target, False
        work.mkdir(parents=True, exist_ok=True)
        log.info("%s: building %s on rank %d of %d", stage, target, me, world)
        try:
            build(work)
        except BaseException as error:
            mark_failed(work, error)
            raise
        (work / f"built-{me}-of-{world}.{launch}").touch()
        if me != 0:
            wait_for(target, ["DONE"], what=f"{stage}: rank 0 to complete {target.name}", work=work)
            return target, True
        wait_for(work, [f"built-{r}-of-{world}.{launch}" for r in range(world)], what=f"{stage}: every rank")
        clean_shards(work)
        for marker in work.glob("built-*"):
            marker.unlink()
        (work / "inputs.json").write_text(strict_json(inputs, "inputs.json", indent=2, sort_keys=True, default=str))
        (work / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        os.replace(work, target)
    return target, True


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file; strict JSON (a NaN
    or an infinity is refused, naming the file and the key: `rrhf.data.strict_json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = strict_json(obj, path, indent=2, sort_keys=True, default=str)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
