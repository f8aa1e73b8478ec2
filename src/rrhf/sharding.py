"""Data-parallel work inside a stage: every rank of a launch computes its share of the batches, all get all.

A stage forms its batches exactly as one process would (same order, same members) and hands them to
`map_batches`. Batch j goes to rank j % world_size. Each rank appends one JSON line per finished batch to its
own shard file in the stage's work folder, so a killed rank resumes after its last complete batch (a batch
is written whole or not at all: it is one line). When its share is done a rank leaves a mark, waits for the
marks of every rank, and reads all shards. Results are therefore the same bytes whatever the number of ranks,
for any computation that depends only on the batch (greedy, beam and diverse beam generation, seeded
sampling, scoring), and one process runs the very same code with a share of everything.

Ranks meet through files, not collective calls: the stages before training run before torch.distributed is
set up, and a rank that waits long for a slower one must not hit a communication timeout. The work folder
has to be shared by the ranks (one node, or a shared file system across nodes), as the artifacts are.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from rrhf.data import strict_json
from rrhf.launch import crash_point, launch_id, rank, world_size
from rrhf.locks import PEER_TIMEOUT_ENV, describe, holder_ended, peer_wait_limit, read_holder

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
PEER_CHECK_SECONDS = 2.0  # how often a waiting rank looks for signs of the others


def shard_files(work: Path, name: str) -> list[Path]:
    return sorted(Path(work).glob(f"{name}.shard-*.jsonl"))


def _read_shards(work: Path, name: str) -> dict[int, list[Any]]:
    """Finished batches found in any shard of `name` (of this launch or an earlier one), by batch number."""
    done: dict[int, list[Any]] = {}
    for path in shard_files(work, name):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    break  # a line cut short by a kill: that batch is redone
                row = json.loads(line)
                done.setdefault(row["batch"], row["results"])
    return done


def _trim(path: Path) -> None:
    """Drop a last line cut short by a kill, so that appending goes on from a whole line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def map_batches(
    work: Path,
    name: str,
    batches: Sequence[Sequence[int]],
    compute: Callable[[list[int]], list[Any]],
    *,
    desc: str,
    unit: str = "item",
    crash_stage: str | None = None,
) -> dict[int, Any]:
    """`compute(batch)` for every batch (a list of item indices; it returns one JSON-serialisable result per
    item), this rank doing batches j with j % world_size == rank. Returns every item's result by index, on
    every rank, once all ranks are done."""
    work, me, world = Path(work), rank(), world_size()
    done = _read_shards(work, name)
    mine = [j for j in range(me, len(batches), world) if j not in done]
    total = sum(len(batches[j]) for j in range(me, len(batches), world))
    # Rank 0's bar stands for all: it does its share of the same batches.
    bar = tqdm(
        total=total,
        initial=total - sum(len(batches[j]) for j in mine),
        unit=unit,
        disable=me != 0,
        desc=desc if world == 1 else f"{desc} (rank 0 of {world})",
    )
    if mine and len(mine) < len(range(me, len(batches), world)):
        log.info("%s: resuming, %d of this rank's batches left", desc, len(mine))
    shard = work / f"{name}.shard-{me}-of-{world}.jsonl"
    _trim(shard)
    with open(shard, "a", encoding="utf-8") as handle:
        for j in mine:
            results = compute(list(batches[j]))
            if len(results) != len(batches[j]):
                raise RuntimeError(f"{desc}: {len(results)} results for a batch of {len(batches[j])}")
            handle.write(strict_json({"batch": j, "results": results}, f"{shard} (batch {j})") + "\n")
            handle.flush()
            bar.update(len(batches[j]))
            if crash_stage:
                crash_point(crash_stage)
    bar.close()
    launch = launch_id()
    (work / f"{name}.done-{me}-of-{world}.{launch}").touch()
    wait_for(work, [f"{name}.done-{r}-of-{world}.{launch}" for r in range(world)], what=f"{desc}: the other ranks")
    done = _read_shards(work, name)
    missing = [j for j in range(len(batches)) if j not in done]
    if missing:
        raise RuntimeError(f"{desc}: batches {missing[:5]} have no results although every rank is done")
    return {i: result for j, batch in enumerate(batches) for i, result in zip(batch, done[j])}


class Mapper(Protocol):
    """How a function runs its batches: `local_map` in this process, or a stage's `shard_mapper`."""

    def __call__(
        self,
        batches: Sequence[Sequence[int]],
        compute: Callable[[list[int]], list[Any]],
        *,
        desc: str,
        unit: str = "item",
    ) -> dict[int, Any]: ...


def local_map(
    batches: Sequence[Sequence[int]], compute: Callable[[list[int]], list[Any]], *, desc: str, unit: str = "item"
) -> dict[int, Any]:
    """Every batch in this process, in order, with a progress bar: results by item index."""
    out: dict[int, Any] = {}
    with tqdm(total=sum(len(b) for b in batches), desc=desc, unit=unit) as bar:
        for batch in batches:
            out.update(zip(batch, compute(list(batch))))
            bar.update(len(batch))
    return out


def shard_mapper(work: Path, name: str, *, crash_stage: str | None = None) -> Mapper:
    """A Mapper that divides the batches among the ranks of the launch, with shards in `work` named `name`."""

    def run(
        batches: Sequence[Sequence[int]], compute: Callable[[list[int]], list[Any]], *, desc: str, unit: str = "item"
    ) -> dict[int, Any]:
        return map_batches(work, name, batches, compute, desc=desc, unit=unit, crash_stage=crash_stage)

    return run


def rank_lock(work: Path, r: int) -> Path:
    """The lock rank r of a launch holds while it builds in the stage work folder `work` (`<key>.partial`) and
    until the artifact is complete (`rrhf.artifacts.run_stage` with all_ranks); it names the rank's process."""
    work = Path(work)
    return work.with_name(f"{work.name.removesuffix('.partial')}.rank{r}.lock")


def _lost_peer(work: Path, launch: str) -> str | None:
    """A rank of this launch, on this host, whose process has ended while the stage is unfinished (None: none
    known). A rank on another host cannot be asked: the time limit of `wait_for` covers it."""
    for r in range(world_size()):
        if r == rank():
            continue
        holder = read_holder(rank_lock(work, r))
        # A lock is emptied when released: one that names a rank of this launch was held when it ended.
        if holder is not None and holder.get("launch") == launch and holder_ended(holder):
            return f"rank {r} ({describe(holder)}) has ended"
    return None


def _progress(work: Path) -> tuple:
    """What changes while any rank works in `work`: its files' names, sizes and times (appended shards, marks)."""
    try:
        stats = [(entry.name, entry.stat()) for entry in os.scandir(work)]
    except FileNotFoundError:  # completed and renamed by rank 0
        return ()
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))


def wait_for(folder: Path, names: Sequence[str], *, what: str, work: Path | None = None) -> None:
    """Block until every file in `names` exists in `folder` (logging now and then while waiting).

    Raises when another rank of this launch has marked the stage's work folder as failed (`mark_failed`), when
    a rank of this launch on this host has ended (its lock names it: `rank_lock`), and when nothing in the work
    folder has changed for `RRHF_PEER_TIMEOUT_S` (default 1800 s; the other ranks append to it as each batch
    is done): without a launcher that ends the job when one task fails or is lost, the others would wait until
    the job's time limit.
    """
    limit, started, told = peer_wait_limit(), time.monotonic(), 0.0
    work, launch = Path(work or folder), launch_id()
    checked, seen, quiet_since = started, _progress(work), started
    while not all((Path(folder) / n).exists() for n in names):
        failed = sorted(work.glob(f"failed-*.{launch}"))
        if failed:
            raise RuntimeError(f"{what}: another rank failed: {failed[0].read_text().strip()}")
        now = time.monotonic()
        waited = now - started
        if waited - told > 60:
            log.info("waiting for %s (%.0f s)", what, waited)
            told = waited
        if now - checked >= PEER_CHECK_SECONDS:
            checked = now
            lost = _lost_peer(work, launch)
            if lost and not all((Path(folder) / n).exists() for n in names):
                raise RuntimeError(f"{what}: {lost} before finishing its part; rerun to resume the stage")
            progress = _progress(work)
            if progress != seen:
                seen, quiet_since = progress, now
            elif now - quiet_since >= limit:
                raise TimeoutError(
                    f"{what}: nothing in {work} has changed for {now - quiet_since:.0f} s: another "
                    f"rank is lost or stuck. {PEER_TIMEOUT_ENV} sets this limit (now {limit:g} s)"
                )
        time.sleep(POLL_SECONDS)


def mark_failed(work: Path, error: BaseException) -> None:
    """Tell the other ranks of this launch, waiting in `wait_for`, that this rank's part of the stage failed."""
    if Path(work).is_dir():
        (Path(work) / f"failed-{rank()}.{launch_id()}").write_text(f"rank {rank()}: {type(error).__name__}: {error}\n")


def clean(work: Path) -> None:
    """Remove the shards and marks once the stage's own files hold the results."""
    for path in Path(work).glob("*.shard-*.jsonl"):
        path.unlink()
    for path in [*Path(work).glob("*.done-*-of-*.*"), *Path(work).glob("failed-*")]:
        path.unlink()


def length_sorted_batches(lengths: Sequence[int], batch_size: int, *, longest_first: bool = False) -> list[list[int]]:
    """Item indices in batches of similar length (little padding); ties keep their input order."""
    order = sorted(range(len(lengths)), key=(lambda i: -lengths[i]) if longest_first else (lambda i: lengths[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
