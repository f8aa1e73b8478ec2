"""The whole config checked before any stage does work (issue 13 item 2): rrhf.config_checks.check_config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

import rrhf  # noqa: F401  (registers the config resolvers)
from rrhf.config_checks import LAUNCH_VARIABLES, ConfigError, check_config
from rrhf.ppo import PPOConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "composed_configs.json"
A_FILE = ROOT / "pyproject.toml"  # a path that is a file, where a folder belongs


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
    return cfg


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        check_config(_compose(*overrides), ppo=PPOConfig)
    return str(error.value)


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> None:
    """As under torchrun: the variables of a distributed launch are set."""
    for key, value in zip(LAUNCH_VARIABLES, ("0", "0", "1", "127.0.0.1", "29500")):
        monkeypatch.setenv(key, value)


@pytest.fixture
def plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)


def test_every_composed_config_passes(launched) -> None:
    """The checks refuse nothing the shipped configs compose to (under a launch, as their profiles need)."""
    given = ROOT / "tests" / "fixtures"  # stands in for a user's model folder and training file
    configs = json.loads(FIXTURE.read_text())
    for cfg in configs.values():
        cfg = json.loads(
            json.dumps({k: v for k, v in cfg.items() if not k.startswith("hydra")})
            .replace("<root>", str(ROOT))
            .replace("/somewhere/given", str(given))
        )
        if cfg["sampling"].get("train_file"):
            cfg["sampling"]["train_file"] = str(FIXTURE)
        check_config(cfg, ppo=PPOConfig)  # raises with the key on a refusal
    assert len(configs) > 60


# The values the issue names, and one of each other kind: (overrides, what the message must say).
BAD = {
    "learning rate not a number": (
        ["trainer.args.learning_rate=abc"],
        "trainer.args.learning_rate='abc': expected a finite number > 0.0",
    ),
    "seed not a number": (["seed=abc"], "seed='abc': expected an integer in [0, 2**32)"),
    "negative seed": (["seed=-1"], "seed=-1: expected an integer in [0, 2**32)"),
    "sampling batch of 0": (["sampling.batch_size=0"], "sampling.batch_size=0: expected an integer >= 1"),
    "train size 0": (["task.train_size=0"], "task.train_size=0: expected an integer >= 1, or null (every row)"),
    "test size 0": (["task.test_size=0"], "task.test_size=0: expected an integer >= 1, or null (every row)"),
    "train size -3 (a slice)": (["task.train_size=-3"], "task.train_size=-3: expected an integer >= 1"),
    "train size a float": (["task.train_size=2.5"], "task.train_size=2.5: expected an integer >= 1"),
    "eval batch of 0": (["eval.batch_size=0"], "eval.batch_size=0: expected an integer >= 1"),
    "perplexity batch of 0": (["eval.ppl_batch_size=0"], "eval.ppl_batch_size=0: expected an integer >= 1"),
    "eval min above max": (["eval.min_new_tokens=9"], "eval.min_new_tokens=9: expected at most eval.max_new_tokens=8"),
    "no new tokens": (["task.max_new_tokens=0"], "task.max_new_tokens=0"),
    "learning rate NaN": (["trainer.args.learning_rate=nan"], "trainer.args.learning_rate=nan: expected a finite"),
    "max_steps 0": (["trainer.args.max_steps=0"], "trainer.args.max_steps=0: expected -1 or an integer >= 1"),
    "batch a float": (
        ["trainer.args.per_device_train_batch_size=1.5"],
        "trainer.args.per_device_train_batch_size=1.5: expected an integer >= 1",
    ),
    "unknown trainer argument": (
        ["+trainer.args.learning_rat=0.1"],
        "trainer.args.learning_rat: not a setting of rrhf.trainer.RRHFArguments; did you mean 'learning_rate'?",
    ),
    "unknown scheduler": (
        ["trainer.args.lr_scheduler_type=cosin"],
        "trainer.args.lr_scheduler_type='cosin': expected one of linear, cosine",
    ),
    "bool for a number": (["trainer.args.weight_decay=true"], "trainer.args.weight_decay=True: expected a finite"),
    "seed inside trainer.args": (["+trainer.args.seed=3"], "trainer.args.seed: set by the pipeline"),
    "two mixed precisions": (["+trainer.args.fp16=true"], "at most one mixed precision"),
    "method setting": (
        ["method.train_args.rank_weight=-1"],
        "method.train_args.rank_weight=-1: expected a finite number >= 0.0",
    ),
    "method setting unknown": (["+method.train_args.rank_wieght=1"], "method.train_args.rank_wieght: not a setting"),
    "unknown method": (
        ["method.name=kto"],
        "method.name='kto': expected one of rrhf, sft, dpo, simpo, cpo, ppo, best_of_n, none",
    ),
    "best-of-n of 0": (["method=best_of_n", "method.n=0"], "method.n=0: expected an integer >= 1"),
    "ppo gamma": (
        ["method=ppo", "method.ppo.gamma=2"],
        "method.ppo.gamma=2: expected a finite number >= 0.0 and <= 1.0",
    ),
    "seed inside method.ppo": (["method=ppo", "+method.ppo.seed=3"], "method.ppo.seed: set by the pipeline"),
    "ppo unknown key": (["method=ppo", "+method.ppo.gama=0.9"], "method.ppo.gama: not a setting of rrhf.ppo.PPOConfig"),
    "dtype name": (["dtype=fp8"], "dtype='fp8': expected one of auto, float32, bfloat16, float16"),
    "sampling dtype name": (["sampling.dtype=half"], "sampling.dtype='half': expected one of auto"),
    "device name": (["device=gpu"], "device='gpu': expected auto, cpu, cuda or cuda:N"),
    "top_p 0": (["sampling.top_p=0"], "sampling.top_p=0: expected a finite number > 0.0 and <= 1.0"),
    "beams not a multiple of groups": (["sampling.num_beams=6"], "sampling.num_beams=6, sampling.num_beam_groups=4"),
    "more candidates than beams": (["sampling=BP", "sampling.num_candidates=5"], "sampling.num_candidates=5"),
    "unknown generator": (["sampling.generator=greedy"], "sampling.generator='greedy': expected one of"),
    "unknown dataset field": (["sampling.dataset_responses=[chosen,best]"], "sampling.dataset_responses="),
    "unknown reward": (["reward.name=rouge"], "reward.name='rouge': expected one of vader"),
    "threads 0": (["threads=0"], "threads=0: expected an integer >= 1, or null"),
    "remote code a string": (["model.trust_remote_code=yes"], "model.trust_remote_code='yes': expected true or false"),
    "missing model folder": (["model.path=/nonexistent/model"], "model.path='/nonexistent/model': no such folder"),
    "missing judge folder": (["eval.judge=./no/judge"], "eval.judge='./no/judge': no such folder"),
    "missing training file": (
        ["sampling=file", "sampling.train_file=/nonexistent.jsonl"],
        "sampling.train_file='/nonexistent.jsonl': no such file",
    ),
    "training file not given": (["sampling=file"], "sampling.train_file='???'"),
    "tables path a file": ([f"paths.tables={A_FILE}"], f"paths.tables='{A_FILE}': is a file, not a folder"),
    "results path a file": ([f"paths.results={A_FILE}"], f"paths.results='{A_FILE}': is a file, not a folder"),
    "artifacts under a file": (
        [f"paths.artifacts={A_FILE}/artifacts"],
        f"paths.artifacts='{A_FILE}/artifacts': lies under {A_FILE}, a file",
    ),
    "RRHF with one sampled candidate": (
        ["sampling=D", "sampling.num_candidates=1"],
        "sampling=D: 1 candidate(s) per query (1 generated",
    ),
    "RRHF with one candidate in all": (
        ["sampling.num_candidates=1", "sampling.dataset_responses=[]"],
        "method=rrhf ranks the candidates of each query, at least 2",
    ),
    "RRHF on one data-set response": (
        ["sampling=P", "sampling.dataset_responses=[chosen]"],
        "sampling=P: 1 candidate(s) per query (0 generated",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_value_is_refused_with_key_value_and_what_is_allowed(case: str, launched) -> None:
    overrides, message = BAD[case]
    assert message in _refused(*overrides)


@pytest.mark.parametrize("profile", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_sharded_profiles_need_a_distributed_launch(profile: str, plain_process, monkeypatch) -> None:
    """In one plain process FSDP fails inside the Trainer ("only works in distributed training") and DeepSpeed
    asks for mpi4py, after sampling and scoring: refused at start-up, naming the launcher that runs them."""
    message = _refused(f"trainer={profile}")
    assert f"trainer={profile}" in message and "torchrun --nproc-per-node=N" in message
    # PPO trains in its own loop: the trainer profile is not used, so not refused.
    check_config(_compose(f"trainer={profile}", "method=ppo"), ppo=PPOConfig)
    for key, value in zip(LAUNCH_VARIABLES, ("0", "0", "1", "127.0.0.1", "29500")):
        monkeypatch.setenv(key, value)
    check_config(_compose(f"trainer={profile}"), ppo=PPOConfig)  # under torchrun (tests/test_distributed.py)


def test_gpu_profiles_run_on_cpu_ranks_and_are_not_refused(plain_process) -> None:
    # bf16 becomes autocast and tf32 is dropped on a CPU (rrhf.placement.trainer_device_args).
    check_config(_compose("trainer=ddp"), ppo=PPOConfig)


@pytest.mark.parametrize(
    "overrides",
    [
        ["sampling=P"],  # the data set's two responses
        ["sampling.num_candidates=1"],  # one generated, then chosen and rejected
        ["sampling=D", "sampling.num_candidates=1", "method.train_args.rank_weight=0"],  # no ranking term asked for
        ["method=sft", "sampling=D", "sampling.num_candidates=1"],  # not RRHF
    ],
)
def test_rrhf_needs_two_candidates_only_where_it_ranks(overrides: list[str], launched) -> None:
    check_config(_compose(*overrides), ppo=PPOConfig)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_cuda_device_is_refused_without_one() -> None:
    assert "device='cuda': this machine has no CUDA device" in _refused("device=cuda")


def _run(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RRHF_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    for key in LAUNCH_VARIABLES:
        env.pop(key, None)
    cmd = [
        sys.executable,
        "run.py",
        "experiment=smoke",
        f"paths.artifacts={tmp}/artifacts",
        f"paths.results={tmp}/results",
        f"paths.tables={tmp}/tables",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.train_size=-3"], "task.train_size=-3: expected an integer >= 1"),
        (["trainer.args.learning_rate=abc"], "trainer.args.learning_rate='abc'"),
        (["trainer=fsdp"], "torchrun --nproc-per-node=N"),
    ],
)
def test_run_py_refuses_before_any_stage(overrides: list[str], message: str, tmp_path: Path) -> None:
    start = time.monotonic()
    result = _run(tmp_path, *overrides)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "artifacts").exists(), "a stage ran before the config was checked"
    assert not (tmp_path / "cache").exists(), "a model was built before the config was checked"
    (failed,) = (tmp_path / "results").rglob("FAILED")
    assert message in failed.read_text()
    assert time.monotonic() - start < 60
