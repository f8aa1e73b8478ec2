"""The whole pipeline through `run.py` and Hydra, on the tiny model: metrics, table, and a free rerun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.runs import run_py

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_py(tmp, "experiment=smoke", *overrides, cache=tmp.parent / "cache", timeout=600)


@pytest.fixture(scope="module")
def smoke(smoke_run: tuple[Path, subprocess.CompletedProcess]) -> tuple[Path, subprocess.CompletedProcess]:
    return smoke_run  # built once for this module and test_robustness.py (tests/conftest.py)


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


def test_collation_of_the_smoke_run(smoke) -> None:
    """Every table every time; Table 6's statistics are those of all candidates; captions name the judge and
    reward model the run used (the tiny model and VADER, not the paper's gpt2-medium and GPT-J)."""
    import pandas as pd

    tmp, _ = smoke
    tables = tmp / "tables"
    for n in (2, 5, 6, 7, 10):  # Table 7 and 10 have no run here: dashes
        for name in (f"table{n}.tex", f"table{n}.csv", f"table{n}_vs_paper.tex", f"table{n}_vs_paper.csv"):
            assert (tables / name).is_file(), name
    metrics = json.loads((tmp / "results" / "smoke" / "metrics.json").read_text())
    stats = json.loads((Path(metrics["candidates"]).parent / "stats.json").read_text())
    row = pd.read_csv(tables / "table6.csv").set_index("row").loc["alpaca-DP"]
    for column, key in (("Mean", "mean"), ("Std.", "std"), ("Max", "max")):
        assert row[f"{column} ours"] == float(f"{stats['all'][key]:.2f}"), column
    assert stats["sampled"] != stats["all"]  # the check tells the two apart
    for n in (2, 6):
        tex = (tables / f"table{n}.tex").read_text()
        assert "Ours: perplexity by embedded:tiny, reward by vader." in tex
        assert "The paper: perplexity by gpt2-medium, reward by Dahoas/gptj-rm-static." in tex
    assert set(pd.read_csv(tables / "table7.csv", keep_default_na=False)["ours"]) == {""}


def test_rerun_does_no_stage_work(smoke) -> None:
    tmp, _ = smoke
    done = {p: p.stat().st_mtime_ns for p in (tmp / "artifacts").glob("*/*/DONE")}
    # sample, score, train; evaluate: initial, trained, data set chosen and rejected
    assert sorted(p.parent.parent.name for p in done) == ["evaluate"] * 4 + ["sample", "score", "train"]
    (trained,) = (p.parent for p in done if p.parent.parent.name == "train")
    # The smoke profile checkpoints every step; once finished, the stage keeps its model, not the resume state.
    assert (trained / "model").is_dir() and not (trained / "checkpoints").exists()
    again = _run(tmp)
    log = again.stdout + again.stderr
    assert "building" not in log and "cached" in log
    assert {p: p.stat().st_mtime_ns for p in (tmp / "artifacts").glob("*/*/DONE")} == done


def test_a_launch_of_another_shape_leaves_the_finished_run_alone(smoke) -> None:
    """Issue 26 item 6: the run folder records its launch shape, and a launch with another process count is
    refused at start-up instead of overwriting the metrics."""
    tmp, _ = smoke
    folder = tmp / "results" / "smoke"
    assert json.loads((folder / "launch.json").read_text()) == {"world_size": 1}
    finished = (folder / "metrics.json").read_bytes()
    env = {
        **os.environ,
        "RRHF_CACHE": str(tmp.parent / "cache"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "WORLD_SIZE": "2",
    }
    cmd = [
        sys.executable,
        "run.py",
        "experiment=smoke",
        f"paths.artifacts={tmp}/artifacts",
        f"paths.results={tmp}/results",
        f"paths.tables={tmp}/tables",
    ]
    other = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "holds a finished run of a 1-process launch" in other.stderr, other.stderr[-3000:]
    assert (folder / "metrics.json").read_bytes() == finished and not (folder / "FAILED").exists()


@pytest.mark.slow
def test_a_finished_run_is_not_failed_by_its_collation(smoke) -> None:
    """Issue 26 item 5: tables the collation after a run refuses to replace are a warning; the run exits 0."""
    import pandas as pd

    tmp, _ = smoke
    folder = tmp / "results" / "smoke"
    finished = (folder / "metrics.json").read_bytes()
    # Tables with more filled cells than the results give: the collation after the rerun leaves them alone.
    fuller = tmp / "fuller"
    fuller.mkdir()
    frame = pd.read_csv(tmp / "tables" / "table6.csv")
    frame[[c for c in frame.columns if c.endswith(" ours")]] = 1.0
    frame.to_csv(fuller / "table6.csv", index=False)
    kept = (fuller / "table6.csv").read_bytes()
    again = _run(tmp, f"paths.tables={fuller}")  # exits 0: the run is finished
    assert f"the tables in {fuller} were not collated" in again.stdout + again.stderr
    assert (fuller / "table6.csv").read_bytes() == kept and (folder / "metrics.json").read_bytes() == finished


@pytest.mark.slow
def test_sweep_logging_to_wandb_offline_runs_every_job(tmp_path: Path) -> None:
    # One wandb run per job, named by its overrides in the sweep's group, holding the training curves and the
    # evaluation metrics; each job closes its run, since the next job of the sweep shares the process.
    env = {**os.environ, "RRHF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "experiment=smoke",
        "seed=1,2",
        "trainer.args.report_to=[wandb]",
        f"paths.artifacts={tmp_path}/artifacts",
        f"paths.results={tmp_path}/results",
        f"paths.tables={tmp_path}/tables",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "results").rglob("metrics.json"))) == 2
    for seed in (1, 2):
        job = next((tmp_path / "results" / "smoke").glob(f"*seed={seed}*"))
        (record,) = job.glob("wandb/offline-run-*/run-*.wandb")  # the job's one run
        data = record.read_bytes()
        assert all(key in data for key in (job.name.encode(), b"smoke", b"train/loss", b"final/reward"))
    assert not list((tmp_path / "artifacts").rglob("offline-run-*"))  # training logged into the job's run


@pytest.mark.parametrize("method", ["best_of_n", "sft"])
def test_baseline_methods_run_through_run_py(method: str, tmp_path: Path) -> None:
    _run(tmp_path, f"method={method}", "name=baseline")
    metrics = json.loads((tmp_path / "results" / "baseline" / f"method={method}" / "metrics.json").read_text())
    assert metrics["final"]["artifact"] != metrics["initial"]["artifact"]
    if method == "sft":  # the data set's chosen response, trained with the plain next-token loss (trlX sft_hh)
        score = next((tmp_path / "artifacts" / "score").glob("*/train.jsonl")).read_text().splitlines()
        assert all(len(json.loads(line)["responses"]) == 1 for line in score)
        log = json.loads(Path(metrics["train_log"]).read_text())
        assert any("loss" in entry for entry in log) and not any("rank_loss" in entry for entry in log)
    table2 = (tmp_path / "tables" / "table2_vs_paper.csv").read_text()
    if method == "best_of_n":
        assert "alpaca-best_of_4,Alpaca,Best-of-4,tiny / imdb_offline" in table2


@pytest.mark.slow
def test_iterated_sampling_trains_each_iteration_from_the_last(tmp_path: Path) -> None:
    _run(tmp_path, "sampling=IP-2", "name=iterate")
    metrics = json.loads((tmp_path / "results" / "iterate" / "sampling=IP-2" / "metrics.json").read_text())
    first, second = metrics["iterations"]
    assert metrics["final"] == second["trained"] and first["trained"] != second["trained"]

    def made_from(stage: str) -> list[str]:
        folders = [p for p in (tmp_path / "artifacts" / stage).iterdir() if p.is_dir()]
        return sorted(json.loads((p / "inputs.json").read_text())["model"] for p in folders)

    # Iteration 2 samples with, and starts training from, iteration 1's model (named by its train stage's key).
    first_model = f"train:{Path(first['train_log']).parent.name}"
    assert made_from("train") == made_from("sample")
    (embedded, trained) = made_from("train")
    assert embedded.startswith("embedded:tiny@") and trained == first_model


def test_authors_preset_trains_p_on_dps_padded_group(tmp_path: Path) -> None:
    # preset=authors (issue 14 item 9): P trains on chosen and rejected of DP's six-candidate group, whose
    # other four rows (sampled past EOS) still set the official loss's padded length.
    _run(tmp_path, "preset=authors", "sampling=P", "name=authors")
    metrics = json.loads(next((tmp_path / "results" / "authors").rglob("metrics.json")).read_text())
    sampled = [
        json.loads(line)
        for line in next((tmp_path / "artifacts" / "sample").glob("*/candidates.jsonl")).read_text().splitlines()
    ]
    assert all(len(row["responses"]) == 4 for row in sampled)
    rows = [json.loads(line) for line in Path(metrics["candidates"]).read_text().splitlines()]
    assert all(len(row["responses"]) == 2 and len(row["pad_responses"]) == 4 for row in rows)
    by_index = {row["index"]: row["responses"] for row in sampled}
    assert [row["pad_responses"] for row in rows] == [by_index[i] for i in range(len(rows))]
    assert "sampled" not in metrics["samples"]  # Table 6's statistics: the two trained candidates only
