"""Stage artifacts: content keys, atomic completion, resume, and concurrent builders."""

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from rrhf.artifacts import digest, run_stage


def test_digest_depends_on_content_not_order() -> None:
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_finished_stage_is_skipped(tmp_path: Path) -> None:
    calls = []

    def build(work: Path) -> None:
        calls.append(work)
        (work / "out.txt").write_text("x")

    first, built = run_stage(tmp_path, "s", {"k": 1}, build)
    again, built_again = run_stage(tmp_path, "s", {"k": 1}, build)
    assert built and not built_again and first == again and len(calls) == 1
    assert (first / "DONE").exists() and (first / "out.txt").read_text() == "x"


def test_failed_stage_leaves_no_finished_folder_and_resumes(tmp_path: Path) -> None:
    def fail(work: Path) -> None:
        (work / "part1").write_text("kept")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "s", {"k": 1}, fail)
    assert not list((tmp_path / "s").glob("*/DONE"))
    assert not [p for p in (tmp_path / "s").iterdir() if p.is_dir() and not p.name.endswith(".partial")]

    seen = []
    folder, _ = run_stage(tmp_path, "s", {"k": 1}, lambda work: seen.append((work / "part1").read_text()))
    assert seen == ["kept"] and (folder / "DONE").exists()


def test_resume_state_is_kept_for_a_rerun_and_dropped_once_finished(tmp_path: Path) -> None:
    def crash(work: Path) -> None:
        (work / "checkpoints").mkdir()
        (work / "checkpoints" / "optimizer.pt").write_text("moments")
        raise RuntimeError("killed after a checkpoint")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "train", {"k": 1}, crash, resume_state="checkpoints")
    resumed_from = []

    def finish(work: Path) -> None:
        resumed_from.append((work / "checkpoints" / "optimizer.pt").read_text())
        (work / "model").mkdir()
        (work / "model" / "weights").write_text("w")

    folder, built = run_stage(tmp_path, "train", {"k": 1}, finish, resume_state="checkpoints")
    assert built and resumed_from == ["moments"]
    assert (folder / "DONE").exists() and (folder / "model" / "weights").read_text() == "w"
    assert not (folder / "checkpoints").exists()

    # A finished artifact written before resume state was dropped loses it the next time a run asks for it.
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "optimizer.pt").write_text("moments")
    again, built_again = run_stage(tmp_path, "train", {"k": 1}, finish, resume_state="checkpoints")
    assert again == folder and not built_again and resumed_from == ["moments"]
    assert not (folder / "checkpoints").exists() and (folder / "model" / "weights").exists()


def _slow_build(root: str, log: str) -> None:
    def build(work: Path) -> None:
        with open(log, "a") as handle:
            handle.write("built\n")
        time.sleep(0.5)
        (work / "out.txt").write_text("x")

    run_stage(Path(root), "s", {"k": "shared"}, build)


def test_concurrent_runs_build_once(tmp_path: Path) -> None:
    log = tmp_path / "log"
    procs = [mp.get_context("fork").Process(target=_slow_build, args=(str(tmp_path), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert log.read_text().count("built") == 1


def _collective_rank(root: str, rank: int, log: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")

    def build(work: Path) -> None:
        with open(log, "a") as handle:
            handle.write(f"rank {rank}\n")
        (work / "checkpoints").mkdir(exist_ok=True)
        (work / "checkpoints" / f"optimizer-{rank}.pt").write_text("moments")
        if rank == 0:
            time.sleep(0.3)
            (work / "model.txt").write_text("weights")

    folder, _ = run_stage(Path(root), "train", {"k": 1}, build, all_ranks=True, resume_state="checkpoints")
    assert (folder / "model.txt").read_text() == "weights"
    if rank == 0:  # rank 0 completes the folder, then drops the resume state
        assert not (folder / "checkpoints").exists()


def test_collective_stage_runs_on_every_rank_and_rank0_finishes_it(tmp_path: Path) -> None:
    log = tmp_path / "log"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_collective_rank, args=(str(tmp_path), r, str(log))) for r in (1, 0)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(log.read_text().split("\n")[:-1]) == ["rank 0", "rank 1"]
    assert [p.name for p in (tmp_path / "train").iterdir() if p.is_dir()] == [digest({"k": 1})]


def _failing_rank(root: str, rank: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", RRHF_LAUNCH_ID="test-launch")

    def build(work: Path) -> None:
        if rank == 1:
            raise ValueError("bad data on rank 1")

    try:
        run_stage(Path(root), "sample", {"k": 2}, build, all_ranks=True)
    except Exception as error:  # the test reads what each rank saw
        Path(out).with_suffix(f".{rank}").write_text(f"{type(error).__name__}: {error}")


def test_a_failing_rank_stops_the_others_instead_of_leaving_them_waiting(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_failing_rank, args=(str(tmp_path), r, str(tmp_path / "seen"))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0, "a rank kept waiting"
    assert (tmp_path / "seen.1").read_text() == "ValueError: bad data on rank 1"
    assert "another rank failed: rank 1: ValueError: bad data on rank 1" in (tmp_path / "seen.0").read_text()
    assert not list((tmp_path / "sample").glob("*/DONE"))
