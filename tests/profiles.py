"""Trainer profiles as the pipeline composes them (conf/trainer/base.yaml and the profile that extends it)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def trainer_profile(name: str) -> dict:
    """The composed `trainer` group of profile `name`: {"name": ..., "args": {...}, "peft": ..., "lora": {...}}."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"trainer={name}"])
    return OmegaConf.to_container(cfg.trainer, resolve=True)
