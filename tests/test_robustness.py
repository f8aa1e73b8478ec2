"""Crash safety, failure isolation, determinism and bad input (through run.py, on the tiny model)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _run(
    tmp: Path, *overrides: str, crash_at: str | None = None, multirun: bool = False, artifacts: Path | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "RRHF_CACHE": str(tmp.parent / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("RRHF_CRASH_AT", None)
    if crash_at:
        env["RRHF_CRASH_AT"] = crash_at
    cmd = [
        sys.executable,
        "run.py",
        *(["-m"] if multirun else []),
        "experiment=smoke",
        f"paths.artifacts={artifacts or tmp / 'artifacts'}",
        f"paths.results={tmp}/results",
        f"paths.tables={tmp}/tables",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _metrics(tmp: Path, run: str = "smoke") -> dict:
    """metrics.json without the artifact paths, which name the (per-test) artifact folder."""

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("artifact", "train_log", "candidates")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(json.loads((tmp / "results" / run / "metrics.json").read_text()))


def _weights(tmp: Path) -> dict[str, torch.Tensor]:
    """The trained policy's weights (the run's one train artifact)."""
    (model,) = (tmp / "artifacts" / "train").glob("*/model/model.safetensors")
    return load_file(model)


@pytest.fixture(scope="module")
def reference_run(smoke_run: tuple[Path, subprocess.CompletedProcess]) -> Path:
    return smoke_run[0]  # the uninterrupted run, shared with test_pipeline_e2e.py (tests/conftest.py)


@pytest.fixture(scope="module")
def reference(reference_run: Path) -> dict:
    return _metrics(reference_run)


def test_smoke_metrics_depend_on_training(reference: dict) -> None:
    """The tests below compare metrics: they only tell a broken resume from a good one if training moves them."""
    assert reference["final"] != reference["initial"]
    assert reference["final"]["ppl_exact"] != reference["initial"]["ppl_exact"]


def test_smoke_metrics_differ_between_seeds(reference: dict, tmp_path: Path) -> None:
    """Seed 2 trains other weights, and the metrics show it (sampling, training order and evaluation all move)."""
    assert _run(tmp_path, "seed=2").returncode == 0
    (metrics,) = (tmp_path / "results").rglob("metrics.json")
    other = _metrics(tmp_path, str(metrics.parent.relative_to(tmp_path / "results")))
    assert other["final"] != reference["final"]


def test_same_config_and_seed_give_identical_metrics(reference: dict, tmp_path: Path) -> None:
    assert _run(tmp_path).returncode == 0
    assert _metrics(tmp_path) == reference


@pytest.mark.parametrize("stage", ["sample", "score", "train", "evaluate"])
def test_killed_stage_resumes_to_the_same_metrics(
    stage: str, reference: dict, reference_run: Path, tmp_path: Path
) -> None:
    from rrhf.tables import find_runs

    killed = _run(tmp_path, crash_at=stage)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL, mid-stage
    partial = list((tmp_path / "artifacts" / stage).glob("*.partial"))
    assert partial, f"the {stage} stage left no partial work to resume from"
    assert not list((tmp_path / "artifacts" / stage).glob("*/DONE")) or stage == "evaluate"
    # The killed run is marked: the collator lists it beside the failed ones instead of skipping it.
    run = tmp_path / "results" / "smoke"
    assert (run / "STARTED").exists() and not (run / "FAILED").exists()
    (listed,) = find_runs(tmp_path / "results").failed
    assert str(run) in listed and "not finished" in listed
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run / "STARTED").exists() and not find_runs(tmp_path / "results").failed
    assert _metrics(tmp_path) == reference
    ours, theirs = _weights(tmp_path), _weights(reference_run)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_sweep_with_a_failing_job_finishes_the_others_and_lists_the_gap(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "responses": ["a", "b"], "scores": [1.0]}\n')
    result = _run(tmp_path, "sampling=DP,file", f"++sampling.train_file={bad}", "name=gap", multirun=True)
    assert result.returncode != 0  # the sweep reports its failure...
    assert list((tmp_path / "results" / "gap").glob("*sampling=DP*/metrics.json"))  # ...after the others ran
    failed = next((tmp_path / "results" / "gap").glob("*sampling=file*/FAILED")).read_text()
    assert "bad.jsonl:1" in failed and "2 responses but 1 scores" in failed
    collate = subprocess.run(
        [sys.executable, "-m", "rrhf.tables", str(tmp_path / "results"), "--out", str(tmp_path / "tables")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert collate.returncode == 0, collate.stderr
    report = (tmp_path / "tables" / "missing.txt").read_text()
    assert "sampling=file" in report and "2 responses but 1 scores" in report


@pytest.mark.slow
def test_rerun_of_a_finished_sweep_of_six_runs_is_fast(tmp_path: Path) -> None:
    sweep = ("seed=1,2,3", "sampling=DP,P", "name=six")
    assert _run(tmp_path, *sweep, multirun=True).returncode == 0
    assert len(list((tmp_path / "results" / "six").glob("*/metrics.json"))) == 6
    # Seeds train on the prompts in another order: other weights, and so other metrics.
    finals = [_metrics(tmp_path, f"six/sampling=DP,seed={seed}")["final"] for seed in (1, 2, 3)]
    assert all(finals[i] != finals[j] for i in range(3) for j in range(i))
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts").glob("*/*/DONE")}
    start = time.monotonic()
    again = _run(tmp_path, *sweep, multirun=True)
    elapsed = time.monotonic() - start
    assert again.returncode == 0 and "building" not in again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts").glob("*/*/DONE")} == done
    assert elapsed < 60, f"rerun of a finished 6-run sweep took {elapsed:.1f} s"


# Bad input: a clear message naming the file, line or key, and no finished artifact left behind.
BAD_TRAINING_FILES = {
    "not json": ("{oops\n", "bad.jsonl:1"),
    "missing field": ('{"query": "q", "responses": ["a"]}\n', "scores"),
    "lengths differ": ('{"query": "q", "responses": ["a", "b"], "scores": [1.0]}\n', "2 responses but 1 scores"),
    "nan score": ('{"query": "q", "responses": ["a", "b"], "scores": [1.0, NaN]}\n', "finite"),
    "infinite score": ('{"query": "q", "responses": ["a", "b"], "scores": [1.0, Infinity]}\n', "finite"),
    "no responses": ('{"query": "q", "responses": [], "scores": []}\n', "bad.jsonl:1: empty 'responses' list"),
    "empty response": (
        '{"query": "q", "responses": ["a", " "], "scores": [1.0, 0.0]}\n',
        "bad.jsonl:1: empty response at position 1",
    ),
    "empty file": ("", "bad.jsonl: no training examples"),
    "whitespace only": ("  \n\n \t \n", "bad.jsonl: no training examples"),
    "empty query": ('{"query": " ", "responses": ["a"], "scores": [1.0]}\n', "bad.jsonl:1: empty 'query'"),
    "not utf-8": (
        b'{"query": "q", "responses": ["a"], "scores": [1.0]}\n'
        + b'{"query": "caf\xe9", "responses": ["a"], "scores": [1.0]}\n',
        r"bad.jsonl:2: byte 15 of the line \(0xe9\) is not UTF-8; data files must be UTF-8",
    ),
    "binary": (bytes(range(256)), r"bad.jsonl:2: byte 118 of the line \(0x80\) is not UTF-8"),
    "duplicate key": (
        '{"query": "q", "responses": ["a"], "scores": [1.0], "scores": [2.0]}\n',
        "bad.jsonl:1: key 'scores' appears twice",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAINING_FILES))
def test_bad_training_file_is_named_and_leaves_nothing(case: str, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import rrhf  # noqa: F401  (registers the config resolvers)
    from rrhf.pipeline import score_stage

    text, message = BAD_TRAINING_FILES[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["sampling=file", f"sampling.train_file={bad}", f"paths.artifacts={tmp_path / 'artifacts'}"],
            return_hydra_config=True,
        )
        HydraConfig.instance().set_config(cfg)
        with pytest.raises(ValueError, match=message) as error:
            score_stage(cfg, "embedded:tiny", None)
    assert "bad.jsonl" in str(error.value)
    # Only a folder marked partial (kept so a crashed stage can resume), never one a later stage would read.
    assert all(p.name.endswith(".partial") for p in (tmp_path / "artifacts").glob("*/*/"))
    assert not list((tmp_path / "artifacts").rglob("DONE"))


def test_failed_run_leaves_a_marker_and_no_metrics(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_TRAINING_FILES["lengths differ"][0])
    result = _run(tmp_path, "sampling=file", f"sampling.train_file={bad}")
    assert result.returncode != 0 and "bad.jsonl:1: 2 responses but 1 scores" in result.stderr
    (failed,) = (tmp_path / "results" / "smoke").rglob("FAILED")
    assert "2 responses but 1 scores" in failed.read_text()
    assert not list((tmp_path / "results").rglob("STARTED"))  # a failed run is FAILED, not unfinished
    assert not list((tmp_path / "results").rglob("metrics.json"))
    artifacts = tmp_path / "artifacts"
    assert not list(artifacts.glob("score/*/DONE")) and not list(artifacts.glob("train/*"))


def test_bad_data_line_is_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    row = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    (data / "train.jsonl").write_text(row + "\n")
    (data / "test.jsonl").write_text(row + "\n" + row + "\n" + '{"prompt": "p", "chosen": "c"}\n')
    result = _run(tmp_path, f"task.source={data}")
    assert result.returncode != 0 and "test.jsonl:3: missing field 'rejected'" in result.stderr
    assert not list((tmp_path / "artifacts").glob("*/*/DONE"))


def test_prompt_longer_than_the_context_is_refused(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        "sampling.max_prompt_tokens=600",
        "eval.max_prompt_tokens=600",
        "task.max_new_tokens=8",
        f"task.source={_long_prompt_data(tmp_path)}",
    )
    assert result.returncode != 0 and "max_prompt_tokens" in result.stderr and "512" in result.stderr


def _long_prompt_data(tmp: Path) -> Path:
    data = tmp / "long"
    data.mkdir()
    row = json.dumps({"prompt": " ".join(["film"] * 700), "chosen": "good", "rejected": "bad"})
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(row + "\n")
    return data


def test_unknown_config_key_and_missing_model_path_are_named(tmp_path: Path) -> None:
    unknown = _run(tmp_path, "sampling.num_beamz=3")
    assert unknown.returncode != 0 and "num_beamz" in unknown.stderr
    missing = _run(tmp_path, "model.path=/nonexistent/model")
    assert missing.returncode != 0 and "/nonexistent/model" in missing.stderr and "no such folder" in missing.stderr


def test_remote_code_needs_the_explicit_opt_in(tmp_path: Path) -> None:
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "rrhf_custom",
                "auto_map": {
                    "AutoConfig": "configuration_custom.CustomConfig",
                    "AutoModelForCausalLM": "modeling_custom.CustomModel",
                },
            }
        )
    )
    result = _run(tmp_path, f"model.path={model}")
    assert result.returncode != 0 and "model.trust_remote_code=true" in result.stderr, result.stderr[-2000:]
