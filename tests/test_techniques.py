"""experiment=techniques: arms shared with findings, the slide's columns derived from configs, the table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fixtures.latex import compile_table
from fixtures.runs import TINY_SWEEP
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import rrhf  # noqa: F401  (registers the config resolvers)
from rrhf.arms import load_arms
from rrhf.techniques import SLIDE, slide_columns

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _compose(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


@pytest.mark.parametrize("arm", ["initial", "rrhf_dp", "ppo"])
def test_shared_arms_compose_as_the_findings_arms(arm: str) -> None:
    """Same composed settings, hence the same artifact keys: findings and techniques train these once."""
    ours = _compose(["experiment=techniques", f"techniques={arm}"])
    theirs = _compose(["experiment=findings", f"findings={arm}"])
    assert ours.pop("name") == "techniques" and theirs.pop("name") == "findings"
    assert ours == theirs


def _columns(arm: str, *extra: str) -> dict[str, str]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=techniques", f"techniques={arm}", *extra])
    return slide_columns(cfg)


def test_slide_columns_come_from_each_method_config() -> None:
    rrhf_dp, dpo, simpo, cpo, ppo = (_columns(a) for a in ("rrhf_dp", "dpo", "simpo", "cpo", "ppo"))
    assert rrhf_dp["Responses per prompt"] == "6 (ranked)" and rrhf_dp["Reference model"] == "no"
    assert rrhf_dp["Online / offline"] == "offline"
    assert dpo["Responses per prompt"] == "2 (best and worst of 6)"
    assert dpo["Reference model"].startswith("yes") and dpo["Explicit reward function"].startswith("no")
    assert "ratio to the reference" in dpo["Explicit reward function"] and "beta 0.1" in dpo["Explicit reward function"]
    assert simpo["Reference model"] == "no" and "mean log-likelihood" in simpo["Explicit reward function"]
    assert "margin gamma 1.375" in simpo["Explicit reward function"]
    assert cpo["Reference model"] == "no" and "NLL (alpha 1)" in cpo["Explicit reward function"]
    assert ppo["Online / offline"] == "online" and ppo["Explicit reward function"].startswith("yes: vader")
    assert ppo["Reference model"].startswith("yes: KL") and ppo["Pre-labelled input"].startswith("no")
    assert ppo["Responses per prompt"] == "1 a rollout, 8 a prompt"  # 8 rounds x 64 rollouts / 64 prompts
    # Derived, not typed in: a setting changes the column.
    assert _columns("dpo", "method.pairs=dataset")["Pre-labelled input"] == "yes: the data set's chosen over rejected"
    assert _columns("rrhf_dp", "sampling=OP-32")["Online / offline"].startswith("online")
    assert _columns("dpo", "method.pairs=all")["Responses per prompt"] == "2 a pair, up to 15 pairs of 6"
    assert set(_columns("initial").values()) == {"-"} and set(_columns("initial")) == set(SLIDE)


def test_paper_scale_composition() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=techniques_hh", "techniques=ppo_hh"], return_hydra_config=True)
    assert cfg.task.name == "hh" and cfg.reward.name == "gptj_rm_static" and cfg.model.name == "alpaca"
    assert cfg.trainer.name == "fsdp" and cfg.method.ppo.num_layers_unfrozen == 2  # trlX ppo_hh, not CPU-scaled
    assert cfg.hydra.sweeper.params.techniques == "initial,sft,rrhf_dp,dpo,simpo,cpo,ppo_hh"
    assert cfg.hydra.sweeper.params.seed == "1,2,3" and "techniques" in cfg.hydra.callbacks


@pytest.mark.slow
def test_techniques_sweep_on_the_tiny_model(tmp_path: Path) -> None:
    """The whole experiment, two seeds: every stage before training is shared by the seeds and the arms."""
    env = {**os.environ, "RRHF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "run.py",
        "experiment=techniques",
        *TINY_SWEEP,
        "trainer.args.max_steps=2",
        # One PPO round of 16 rollouts (`++`: only the PPO arm's method has the key).
        "findings_scale.ppo_iterations=1",
        "++method.ppo.num_rollouts=16",
        "seed=1,2",
        f"paths.artifacts={tmp_path}/artifacts",
        f"paths.results={tmp_path}/results",
        f"paths.tables={tmp_path}/tables",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    artifacts = tmp_path / "artifacts"
    count = {stage: len(list(artifacts.glob(f"{stage}/*/DONE"))) for stage in ("sample", "score", "train", "ppo")}
    # One DP sampling and its scoring for every arm and seed, plus the SFT file; a training per arm and seed.
    assert count == {"sample": 1, "score": 2, "train": 2 * 5, "ppo": 2}

    table = pd.read_csv(tmp_path / "tables" / "techniques.csv").set_index("arm")
    assert list(table.index) == ["initial", "sft", "rrhf_dp", "dpo", "simpo", "cpo", "ppo"]
    assert set(table["seeds"]) == {"1 2"}
    assert table.loc["rrhf_dp", "responses_used_per_prompt"] == 6.0
    assert table.loc["dpo", "responses_used_per_prompt"] <= 2.0 and table.loc["sft", "responses_used_per_prompt"] == 1
    assert table.loc["ppo", "responses_used_per_prompt"] == 16 / 8  # one round of 16 rollouts, 8 prompts
    assert table.loc["initial", "technique"] == "Initial policy" and pd.isna(table.loc["initial", "train_seconds"])
    for arm in ("sft", "dpo", "simpo", "cpo", "ppo"):
        assert table.loc[arm, "train_seconds"] > 0 and table.loc[arm, "train_peak_rss_mib"] > 100
        assert table.loc[arm, "ci_low"] <= table.loc[arm, "reward_vs_rrhf_dp"] <= table.loc[arm, "ci_high"]
        assert table.loc[arm, "seeds_compared"] == 2
        assert 0 <= table.loc[arm, "preference_accuracy"] <= 1
    assert table.loc["dpo", "Reference model"].startswith("yes")
    text = (tmp_path / "tables" / "techniques.md").read_text()
    assert "| DPO (best_worst) |" in text and "training seeds 1, 2" in text
    assert (tmp_path / "tables" / "techniques.tex").read_text().count(r"\toprule") == 1
    if shutil.which("pdflatex"):
        done = compile_table(tmp_path / "tables" / "techniques.tex", tmp_path)
        assert done.returncode == 0, done.stdout[-2000:]
    for run in load_arms(tmp_path / "results" / "techniques", "techniques")["dpo"].runs:
        assert Path(run.metrics["train_log"]).parent.joinpath("reference_logprobs.jsonl").exists()
    # `python -m rrhf.techniques <sweep>` rewrites the same table from the finished runs.
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "rrhf.techniques",
            str(tmp_path / "results" / "techniques"),
            "--out",
            str(tmp_path / "again"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "again" / "techniques.csv").read_text() == (tmp_path / "tables" / "techniques.csv").read_text()
