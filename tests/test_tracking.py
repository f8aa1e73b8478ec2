"""wandb tracking: the mode follows WANDB_MODE and the login, a pipeline run is one wandb run named by its
overrides and grouped by its sweep, and the Trainer, PPO and OP log into it."""

import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rrhf import tracking


@pytest.fixture
def no_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_mode_follows_wandb_mode_and_login(no_login: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither a mode nor a key: wandb would stop at once, so the run logs offline.
    assert not tracking.logged_in() and tracking.fallback_mode() == "offline"
    no_login.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    no_login.chmod(0o600)
    assert tracking.logged_in() and tracking.fallback_mode() is None  # wandb's own default: online
    no_login.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.fallback_mode() is None
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.fallback_mode() is None  # the user's choice, whatever it is


def test_scalars_flatten_and_drop_what_is_not_a_number() -> None:
    values = {"reward": {"mean": 0.5, "std": 1}, "artifact": "/a/b", "done": True, "step": 3}
    assert tracking.scalars(values, "op") == {"op/reward/mean": 0.5, "op/reward/std": 1, "op/step": 3}


def test_a_pipeline_run_is_one_wandb_run(no_login: Path, tmp_path: Path) -> None:
    cfg = OmegaConf.create(
        {"name": "sweep", "seed": 1, "method": {"name": "rrhf"}, "trainer": {"args": {"report_to": ["wandb"]}}}
    )
    run_dir = tmp_path / "results" / "sweep" / "sampling=BP,seed=1"
    tracking.start(cfg, run_dir)  # no mode, no login: offline
    try:
        import wandb

        assert wandb.run.name == "sampling=BP,seed=1" and wandb.run.group == "sweep"
        tracking.log({"round": 1, "mean_kl": 0.25}, prefix="ppo")
        with tracking.trainer_run(["wandb"], tmp_path / "train"):  # the Trainer logs into the open run
            assert tracking.active()
        assert tracking.active()  # ... and leaves it open
        tracking.finish(
            {"initial": {"reward": 0.1, "artifact": "x"}, "final": {"reward": 0.5}, "samples": {"all": {"mean": -0.5}}}
        )
    finally:
        if tracking.active():
            wandb.finish()
    assert not tracking.active()
    assert not (tmp_path / "train").exists()
    (record,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    keys = (b"ppo/mean_kl", b"final/reward", b"samples/all/mean", b"sweep")
    # wandb's service process may still be writing the record when finish() returns on a loaded machine.
    deadline = time.time() + 20
    while not all(key in record.read_bytes() for key in keys) and time.time() < deadline:
        time.sleep(0.5)
    data = record.read_bytes()
    assert all(key in data for key in keys), [key for key in keys if key not in data]


def test_nothing_is_opened_when_the_trainer_does_not_report_to_wandb(no_login: Path, tmp_path: Path) -> None:
    cfg = OmegaConf.create({"name": "smoke", "method": {"name": "rrhf"}, "trainer": {"args": {"report_to": []}}})
    tracking.start(cfg, tmp_path / "run")
    assert not tracking.active() and not (tmp_path / "run").exists()
    tracking.log({"x": 1.0})  # no-ops
    tracking.finish({"final": {"reward": 0.0}})
