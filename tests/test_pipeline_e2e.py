"""The whole pipeline through `run.py` and Hydra, on the tiny model: metrics, table, and a free rerun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RRHF_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "run.py", "experiment=smoke", f"paths.artifacts={tmp}/artifacts",
           f"paths.results={tmp}/results", f"paths.tables={tmp}/tables", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("smoke")
    return tmp, _run(tmp)


def test_smoke_run_writes_metrics_and_table(smoke) -> None:
    tmp, _ = smoke
    metrics = json.loads((tmp / "results" / "smoke" / "metrics.json").read_text())
    for policy in ("initial", "trained"):
        assert set(metrics[policy]) >= {"reward", "ppl_paper", "ppl_exact"}
        assert -1.0 <= metrics[policy]["reward"] <= 1.0 and metrics[policy]["ppl_exact"] > 1.0
    assert metrics["initial"]["artifact"] != metrics["trained"]["artifact"]
    stats = metrics["samples"]["all"]
    assert stats["max"] >= stats["mean"] and stats["std"] >= 0
    assert (tmp / "tables" / "table6.tex").read_text().count(r"\toprule") == 1
    train_rows = (Path(metrics["train_log"]).parent.parent.parent / "score").glob("*/train.jsonl")
    for line in next(train_rows).read_text().splitlines():
        row = json.loads(line)
        assert len(row["responses"]) == len(row["scores"]) == 6  # 4 sampled + chosen + rejected


def test_rerun_does_no_stage_work(smoke) -> None:
    tmp, _ = smoke
    done = {p: p.stat().st_mtime_ns for p in (tmp / "artifacts").glob("*/*/DONE")}
    # sample, score, train; evaluate: initial, trained, data set chosen and rejected
    assert sorted(p.parent.parent.name for p in done) == ["evaluate"] * 4 + ["sample", "score", "train"]
    again = _run(tmp)
    log = again.stdout + again.stderr
    assert "building" not in log and "cached" in log
    assert {p: p.stat().st_mtime_ns for p in (tmp / "artifacts").glob("*/*/DONE")} == done
