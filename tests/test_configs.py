"""Every option of every config group composes, alone and as each experiment."""

from pathlib import Path

import pytest
from fixtures.composed_configs import GROUPS as COMPOSED_GROUPS
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import rrhf  # noqa: F401  (registers the config resolvers)

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = COMPOSED_GROUPS  # one list of the config groups: the recorded fixture composes the same ones


def _options(group: str) -> list[str]:
    # A file starting with "_" is a base that options extend (conf/method/_pairwise.yaml), not a choice.
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        # Every interpolation must resolve, not only parse (Hydra's own node needs a running job).
        OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True, throw_on_missing=True
        )
        return cfg


# Options that name a user's own file or checkpoint: composing fails until it is given.
NEEDS_VALUE = {("model", "smollm2_sft"): "model.path", ("sampling", "file"): "sampling.train_file"}


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
    from rrhf.sampling import generation_settings

    dp, d, p = (_compose([f"sampling={name}"]).sampling for name in ("DP", "D", "P"))
    plain = lambda s: generation_settings(OmegaConf.to_container(s, resolve=True))  # noqa: E731
    assert plain(dp) == plain(d) == plain(p) and list(dp.dataset_responses) == ["chosen", "rejected"]
    # D and P are parts of DP's group, as the authors trained them from one file (train.py:259-270).
    assert (dp.train_on, d.train_on, p.train_on) == ("all", "sampled", "provided")


def _leaves(cfg, prefix: str = "") -> dict:
    if not isinstance(cfg, dict) or not cfg:
        return {prefix.rstrip("."): cfg}
    return {k: v for key, value in cfg.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}


def _plain(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def test_paper_scale_ppo_runs_trlx_budget() -> None:
    # Issue 14 item 1: ppo_hh's train.total_steps (10,000 optimiser steps) in rounds of num_rollouts / batch_size
    # minibatches x ppo_epochs updates; the findings arm keeps its own small budget.
    ppo = _compose(["experiment=table2", "method=ppo"]).method.ppo
    per_round = ppo.num_rollouts // ppo.batch_size * ppo.ppo_epochs
    assert per_round == 64 and ppo.iterations == 10000 // per_round == 156
    # Item 6: PPO as trlX v0.6.0 ran it when the paper's numbers were made.
    assert not ppo.delta_reward and ppo.update_order == "minibatch" and ppo.controller_kl == "token_mean"
    assert ppo.max_prompt_tokens == 1024 - 128 and ppo.prompt_bos == "none" and ppo.reward_separator == ""
    assert ppo.max_new_tokens == 128 and ppo.target == 6.0 and ppo.init_kl_coef == 0.05
    assert _compose(["experiment=findings", "findings=ppo"]).method.ppo.iterations == 8


def test_alpaca_sft_is_trlx_sft_hh() -> None:
    # Issue 14 item 7.
    cfg = _compose(["experiment=alpaca_sft"])
    args = cfg.method.train_args
    assert cfg.method.name == "sft" and cfg.method.source == "Dahoas/full-hh-rlhf" and cfg.model.name == "alpaca"
    assert args.objective == "lm" and args.model_max_length == 1024 and args.max_steps == 10000
    assert args.learning_rate == 1e-6 and args.lr_scheduler_type == "constant" and args.warmup_steps == 0
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.weight_decay) == (0.9, 0.95, 1e-8, 1e-6)
    assert args.per_device_train_batch_size == 4 and args.gradient_accumulation_steps == 1
    assert args.train_sampling_strategy == "sequential"
    offline = _compose(["method=sft"])  # the embedded default fine-tunes on its own data, for its epochs
    assert (
        offline.method.source is None
        and offline.task.name == "imdb_offline"
        and "max_steps" not in offline.method.train_args
    )


def test_imdb_is_the_rl4lms_task() -> None:
    # Issue 14 item 8: prompts, reward text, generation and perplexity as RL4LMs' IMDB task.
    cfg = _compose(["experiment=imdb"])
    assert cfg.task.prefix.rule == "rl4lms" and cfg.task.prefix.prompt_fraction == 0.5
    assert cfg.task.prefix.shuffle_seed == 42 and cfg.task.prefix.train_fraction == 0.8 and cfg.task.test_size == 5000
    assert cfg.reward.text == "prompt+response" and cfg.reward.separator == "" and cfg.reward.truncation_side == "left"
    assert (cfg.eval.max_prompt_tokens, cfg.eval.min_new_tokens, cfg.eval.max_new_tokens) == (64, 48, 48)
    assert cfg.eval.reference_ppl and not cfg.eval.stop_cut
    for setting in ("imdb_BP", "imdb_B", "imdb_OP-128", "imdb_OP-128+KL"):
        s = _compose(["experiment=imdb", f"sampling={setting}"]).sampling
        assert (s.max_prompt_tokens, s.min_new_tokens, s.max_new_tokens) == (64, 48, 48), setting


def test_authors_preset_sets_each_switch_and_nothing_else() -> None:
    # Issue 14 item 9: every switch preset=authors sets, from the paper's value to the authors' code's.
    paper, authors = _leaves(_plain(_compose([]))), _leaves(_plain(_compose(["preset=authors"])))
    assert {k: (paper[k], authors[k]) for k in paper if paper[k] != authors[k]} == {
        "method.train_args.semantics": ("paper", "official"),
        "sampling.stop_at_eos": (True, False),
        "sampling.dtype": ("auto", "bfloat16"),
        "sampling.prompt_bos": ("keep", "cut"),
        "sampling.pad_over_group": (False, True),
        "sampling.add_pad_token": (False, True),
        "trainer.args.add_pad_token": (False, True),
    }
    assert set(authors) == set(paper)
    for overrides in (["sampling=P"], ["sampling=D"], ["sampling=BP"], ["experiment=table6"], ["method=ppo"]):
        cfg = _compose(["preset=authors", *overrides])
        assert cfg.method.train_args.semantics == "official" and cfg.sampling.stop_at_eos is False, overrides


def test_unknown_option_fails_with_its_name() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="sampling"):
        _compose(["sampling=XYZ"])


def test_run_folder_names_stay_below_the_file_name_limit() -> None:
    from rrhf import dirname_safe

    # A path among the values makes no sub-folder; the hash says which path it was (see test_run_folders.py).
    assert dirname_safe("model=tiny,task.source=/data/x").startswith("model=tiny,task.source=_data_x-")
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
