"""End to end through a real SLURM cluster: a Hydra multirun with hydra/launcher=slurm_local.

Needs a running cluster (`sudo .ci/slurm.sh` starts one on this machine); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SEEDS = (1, 2)
RUN_TIMEOUT_S = 600

pytestmark = pytest.mark.slurm


def _cluster_problem() -> str | None:
    """Why no SLURM cluster can take jobs here, or None when one can."""
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (start a local cluster with `sudo .ci/slurm.sh`)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=15)
    except (subprocess.TimeoutExpired, OSError) as exc:
        return f"sinfo does not answer: {exc}"
    if out.returncode != 0 or "up" not in out.stdout.split():
        return f"sinfo shows no partition that is up: {(out.stderr or out.stdout).strip()!r}"
    return None


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def _python() -> str:
    venv_python = REPO / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Hydra job folders: every folder with a .hydra/ inside (whatever the subdir naming)."""
    return sorted(p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir())


def _array_task_dirs(sweep_dir: Path) -> dict[str, Path]:
    """submitit's per-task folders, `<array job id>_<index>`, keyed by that id."""
    found = {}
    for submitit_dir in sweep_dir.rglob(".submitit"):
        for p in submitit_dir.iterdir():
            if p.is_dir() and re.fullmatch(r"\d+_\d+", p.name):
                found[p.name] = p
    return found


def _slurm_states(array_ids: set[str]) -> dict[str, str]:
    """Job states as SLURM records them: sacct when accounting is on, else the controller's memory."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(sorted(array_ids))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    states = {}
    if out.returncode == 0:
        for line in out.stdout.splitlines():
            job_id, _, state = line.partition("|")
            states[job_id] = state.split()[0] if state else ""
        return states
    # Accounting disabled: finished jobs stay visible in scontrol for MinJobAge (300 s by default).
    for array_id in array_ids:
        show = subprocess.run(["scontrol", "-o", "show", "job", array_id], capture_output=True, text=True, timeout=30)
        for line in show.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            states[f"{fields.get('ArrayJobId')}_{fields.get('ArrayTaskId')}"] = fields.get("JobState", "")
    return states


def test_multirun_goes_through_slurm(slurm_cluster: None, tmp_path: Path) -> None:
    assert (REPO / "run.py").exists(), "run.py (the pipeline entry point) is missing"
    name = f"slurm-test-{uuid.uuid4().hex[:8]}"
    sweep_dir = REPO / "results" / name
    cmd = [
        _python(),
        "run.py",
        "-m",
        "experiment=smoke",
        "model=tiny",
        "hydra/launcher=slurm_local",
        "seed=" + ",".join(map(str, SEEDS)),
        f"name={name}",
        # `++` overrides a key, or adds it (unused) where the config has none.
        f"++paths.artifacts={tmp_path / 'artifacts'}",
        # Leave paper_tables/ alone: the multirun-end callback would collate this smoke run into it.
        "++collate=false",
    ]
    # A fresh asset cache: both jobs then build the tiny model at once, as the jobs of a real sweep may.
    env = {**os.environ, "RRHF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    passed = False
    try:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"multirun did not finish within {RUN_TIMEOUT_S} s: {' '.join(cmd)}")
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

        job_dirs = _job_dirs(sweep_dir)
        assert len(job_dirs) == len(SEEDS), f"expected {len(SEEDS)} job folders in {sweep_dir}: {job_dirs}"
        seeds_run = set()
        for job_dir in job_dirs:
            metrics = sorted(job_dir.rglob("metrics.json"))
            assert metrics, f"no metrics.json in {job_dir}"
            assert isinstance(json.loads(metrics[0].read_text()), dict)
            overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
            seeds_run |= {int(o.split("=", 1)[1]) for o in overrides if o.startswith("seed=")}
        assert seeds_run == set(SEEDS)

        # The jobs ran as SLURM array tasks: submitit named their folders after the SLURM job ids,
        # and SLURM itself recorded them as completed.
        task_dirs = _array_task_dirs(sweep_dir)
        assert len(task_dirs) == len(SEEDS), f"expected one submitit folder per job, got {sorted(task_dirs)}"
        for task_id, task_dir in task_dirs.items():
            assert (task_dir / f"{task_id}_0_log.out").exists(), f"no SLURM log in {task_dir}"
        array_ids = {t.split("_")[0] for t in task_dirs}
        expected = dict.fromkeys(task_dirs, "COMPLETED")
        # slurmctld reports finished jobs to the accounting daemon a moment later.
        deadline = time.monotonic() + 20
        while (states := {t: _slurm_states(array_ids).get(t) for t in task_dirs}) != expected:
            assert time.monotonic() < deadline, f"SLURM job states: {states}"
            time.sleep(0.5)
        passed = True
    finally:
        if not passed and sweep_dir.exists():
            # Do not leave the jobs of a failed or timed-out run on the cluster.
            for array_id in {t.split("_")[0] for t in _array_task_dirs(sweep_dir)}:
                subprocess.run(["scancel", array_id], capture_output=True, timeout=30)
        shutil.rmtree(sweep_dir, ignore_errors=True)


def test_two_task_job_trains_on_two_ranks(slurm_cluster: None, tmp_path: Path) -> None:
    """hydra/launcher=slurm_local_ddp: one SLURM job of two tasks, which run.py turns into two torch ranks
    (gloo on the CPU) that share the stages and train together with DDP; rank 0 writes the metrics."""
    name = f"slurm-ddp-test-{uuid.uuid4().hex[:8]}"
    sweep_dir = REPO / "results" / name
    cmd = [
        _python(),
        "run.py",
        "-m",
        "experiment=smoke",
        "trainer=ddp",
        "hydra/launcher=slurm_local_ddp",
        "trainer.args.per_device_train_batch_size=2",
        "trainer.args.gradient_accumulation_steps=1",
        "trainer.args.bf16=false",
        f"name={name}",
        f"++paths.artifacts={tmp_path / 'artifacts'}",
        "++collate=false",
    ]
    env = {**os.environ, "RRHF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        (job_dir,) = _job_dirs(sweep_dir)
        assert len(list(sweep_dir.rglob("metrics.json"))) == 1 and (job_dir / "metrics.json").exists()
        # One job, two tasks: submitit keeps each task's output as <job id>_<task>_log.out.
        logs = {r: next(sweep_dir.glob(f".submitit/*/*_{r}_log.out")).read_text() for r in (0, 1)}
        for r, text in logs.items():
            assert re.search(rf"train: building \S+ on rank {r} of 2", text), f"task {r} did not train"
            assert re.search(rf"sample: building \S+ on rank {r} of 2", text), f"task {r} did not sample"
        (train_inputs,) = (tmp_path / "artifacts" / "train").glob("*/inputs.json")
        assert json.loads(train_inputs.read_text())["world_size"] == 2
    finally:
        shutil.rmtree(sweep_dir, ignore_errors=True)
