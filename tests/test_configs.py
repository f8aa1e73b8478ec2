"""Every option of every config group composes, alone and as each experiment."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import rrhf  # noqa: F401  (registers the config resolvers)

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["task", "model", "sampling", "method", "reward", "eval", "trainer", "experiment", "findings", "techniques"]


def _options(group: str) -> list[str]:
    # A file starting with "_" is a base that options extend (conf/method/_pairwise.yaml), not a choice.
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        # Every interpolation must resolve, not only parse (Hydra's own node needs a running job).
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True,
                              throw_on_missing=True)
        return cfg


# Options that name a user's own file or checkpoint: composing fails until it is given.
NEEDS_VALUE = {("model", "alpaca_sft"): "model.path", ("model", "smollm2_sft"): "model.path",
               ("sampling", "file"): "sampling.train_file"}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if (group, option) in NEEDS_VALUE:
        from omegaconf.errors import MissingMandatoryValue

        key = NEEDS_VALUE[group, option]
        with pytest.raises(MissingMandatoryValue, match=key):
            _compose(overrides)
        overrides.append(f"{key}=/somewhere/given")
    cfg = _compose(overrides)
    assert cfg.model.path and cfg.task.name and cfg.sampling.name and cfg.method.name


def test_launcher_profiles_compose() -> None:
    for option in _options("hydra/launcher"):
        cfg = _compose([f"hydra/launcher={option}"])
        assert cfg.hydra.launcher._target_


def test_default_is_embedded_and_paper_like() -> None:
    cfg = _compose([])
    assert cfg.model.path == "embedded:smollm2"
    assert cfg.sampling.name == "DP" and cfg.sampling.num_beams == 4 and cfg.sampling.num_beam_groups == 4
    assert cfg.sampling.diversity_penalty == 1.0 and cfg.sampling.max_prompt_tokens == 256
    assert cfg.method.name == "rrhf" and cfg.method.train_args.rank_weight == 1.0


def test_dp_and_d_share_generation_settings() -> None:
    dp, d = _compose(["sampling=DP"]).sampling, _compose(["sampling=D"]).sampling
    keep = lambda s: {k: v for k, v in s.items() if k not in ("name", "dataset_responses")}  # noqa: E731
    assert keep(dp) == keep(d) and list(dp.dataset_responses) == ["chosen", "rejected"] and not d.dataset_responses


def test_unknown_option_fails_with_its_name() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="sampling"):
        _compose(["sampling=XYZ"])


def test_run_folder_names_stay_below_the_file_name_limit() -> None:
    from rrhf import dirname_safe

    assert dirname_safe("model=tiny,task.source=/data/x") == "model=tiny,task.source=_data_x"
    long = ",".join(f"trainer.args.option_{i}=value_{i}" for i in range(20))
    name = dirname_safe(long)
    assert len(name.encode()) <= 200 and name.startswith(long[:100])
    assert dirname_safe(long + "x") != name  # distinct overrides keep distinct folders


def test_composed_configs_are_the_recorded_ones() -> None:
    """Every composed config resolves to the values recorded in tests/fixtures/composed_configs.json, so a
    config refactor moves no value and no cache key; a deliberate change rewrites the file (see its script)."""
    import json
    import sys

    sys.path.insert(0, str(CONF.parent / "tests" / "fixtures"))
    from composed_configs import OUT, snapshot

    recorded, now = json.loads(OUT.read_text()), snapshot()
    changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
    assert not changed, f"composed configs changed: {changed}; rewrite with python tests/fixtures/composed_configs.py"
