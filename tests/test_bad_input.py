"""Inputs that used to slip through (issue 13 items 3, 4, 5, 7): each refused with its file, line or key, or
handled by a documented rule. End-to-end crash and bad-file tests through run.py are in test_robustness.py."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import rrhf  # noqa: F401  (registers the config resolvers)
from rrhf import dirname_safe
from rrhf.artifacts import write_json_atomic
from rrhf.data import load_split, read_training_file, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ROW = {"prompt": "the film", "chosen": "was good", "rejected": "was bad"}


def _strict(text: str):
    """json.loads that fails on NaN / Infinity, as a strict JSON reader (a browser, jq) does."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _compose(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["experiment=smoke", f"paths.artifacts={tmp / 'artifacts'}", *overrides],
            return_hydra_config=True,
        )
        HydraConfig.instance().set_config(cfg)
    return cfg


# ----- data-set files (task.source): the same reader as training files -----


@pytest.mark.parametrize(
    "content, message",
    [
        (
            json.dumps(ROW).encode() + b"\n" + b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}\n',
            r"test.jsonl:2: byte 13 of the line \(0xff\) is not UTF-8; data files must be UTF-8",
        ),
        (
            b'{"prompt": "p", "chosen": "c", "rejected": "r", "prompt": "q"}\n',
            "test.jsonl:1: key 'prompt' appears twice",
        ),
        (b"", "test.jsonl: no rows"),
        (b"\n   \n", "test.jsonl: no rows"),
    ],
)
def test_bad_data_set_file_is_named(content: bytes, message: str, tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_split(tmp_path, "test")


def test_a_byte_order_mark_and_windows_line_ends_are_read(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_bytes(
        b"\xef\xbb\xbf" + json.dumps(ROW).encode() + b"\r\n" + json.dumps(ROW).encode() + b"\r\n"
    )
    assert load_split(tmp_path, "train") == [ROW, ROW]


# ----- strict JSON: NaN and Infinity are never written -----


def test_json_writers_refuse_nan_and_infinity_naming_the_key(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    with pytest.raises(ValueError, match=r"metrics.json: final.reward is inf, not a finite number"):
        write_json_atomic(target, {"final": {"reward": math.inf}, "initial": {"reward": 0.1}})
    assert not target.exists() and not list(tmp_path.iterdir())
    rows = tmp_path / "responses.jsonl"
    with pytest.raises(ValueError, match=r"responses.jsonl:2: ppl\[1\] is nan"):
        write_jsonl(rows, [{"ppl": [1.0, 2.0]}, {"ppl": [1.0, math.nan]}])
    assert not list(tmp_path.iterdir())  # neither the file nor its temporary


def test_scores_near_the_float_limit_give_finite_statistics(tmp_path: Path) -> None:
    """Scores whose sum overflows (about 1.8e308) pass the finite check; their statistics are still finite and
    stats.json (what metrics.json's `samples` copies) stays strict JSON."""
    from rrhf.pipeline import score_stage

    huge = tmp_path / "huge.jsonl"
    huge.write_text(
        "".join(
            json.dumps({"query": f"q{i}", "responses": ["a", "b", "c"], "scores": [1.7e308, 1.6e308, -1.5e308]}) + "\n"
            for i in range(3)
        )
    )
    cfg = _compose(tmp_path, "sampling=file", f"sampling.train_file={huge}")
    stats = _strict((score_stage(cfg, "embedded:tiny", None) / "stats.json").read_text())["all"]
    assert all(math.isfinite(v) for v in stats.values())
    in_units = [1.7, 1.6, -1.5]  # of 1e308
    assert stats["max"] == pytest.approx(1.7e308) and stats["mean"] == pytest.approx(statistics.mean(in_units) * 1e308)
    assert stats["std"] == pytest.approx(statistics.pstdev(in_units) * 1e308)


def test_training_file_with_an_empty_query_is_refused_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"query": "", "responses": ["a"], "scores": [1.0]}) + "\n")
    with pytest.raises(ValueError, match="train.jsonl:1: empty 'query'"):
        read_training_file(path)  # also where the pipeline wrote it (training reads it so)


# ----- the gptj-rm-static checkpoint -----


def test_missing_reward_checkpoint_names_repository_file_and_keys() -> None:
    from rrhf.reward import build_scorer

    cfg = OmegaConf.create(
        {
            "name": "gptj_rm_static",
            "checkpoint_repo": "rrhf-tests/no-such-reward-model",
            "checkpoint_file": "hf_ckpt.pt",
            "backbone": "EleutherAI/gpt-j-6B",
            "tokenizer": "gpt2",
            "max_length": 1024,
            "batch_size": 8,
        }
    )
    with pytest.raises(FileNotFoundError) as error:
        build_scorer(cfg)
    message = str(error.value)
    assert "reward.checkpoint_repo='rrhf-tests/no-such-reward-model'" in message
    assert "reward.checkpoint_file='hf_ckpt.pt'" in message and "gptj-rm-static" in message


# ----- item 4: the policy's own empty responses -----


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    from rrhf.assets import resolve_model

    os.environ["RRHF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return resolve_model("embedded:tiny")


def test_an_empty_response_scores_as_the_judge_eos_alone(tiny: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrhf.evaluation import perplexities

    judge, tokenizer = AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)
    assert tokenizer(" ", add_special_tokens=False).input_ids == []  # the judge has no token for " "
    with torch.no_grad():
        logp = torch.log_softmax(judge(torch.tensor([[tokenizer.bos_token_id]])).logits[0, -1].float(), -1)
    nll = -logp[tokenizer.eos_token_id].item()
    for mode, expected in (("paper", 2**nll), ("exact", math.exp(nll))):
        ppl = perplexities(["", " \n ", "the film was good"], judge, tokenizer, mode=mode)
        assert ppl[0] == pytest.approx(expected, rel=1e-5) and ppl[1] == pytest.approx(expected, rel=1e-5)
        assert math.isfinite(ppl[2]) and ppl[2] != pytest.approx(expected)


def _evaluate_chosen(tmp_path: Path, rows: list[dict]) -> dict:
    """The evaluation of a test split made of `rows`' chosen responses (experiment=smoke otherwise)."""
    from rrhf.pipeline import Evaluated, evaluate_stage

    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return evaluate_stage(_compose(tmp_path, f"task.source={data}"), Evaluated.dataset("chosen"))


def test_evaluation_finishes_and_counts_empty_responses(tiny: str, tmp_path: Path) -> None:

    metrics = _evaluate_chosen(tmp_path, [ROW, {**ROW, "chosen": ""}, {**ROW, "chosen": "\n\n"}])
    assert metrics["empty_responses"] == 2 and metrics["num_prompts"] == 3
    assert all(math.isfinite(metrics[k]) for k in ("reward", "ppl_paper", "ppl_exact"))
    responses = [json.loads(line) for line in (Path(metrics["artifact"]) / "responses.jsonl").read_text().splitlines()]
    assert responses[1]["ppl_exact"] == responses[2]["ppl_exact"]  # both scored as EOS alone


def test_an_evaluation_leaves_a_failed_rating_out_of_the_mean_reward(tiny: str, tmp_path: Path, monkeypatch) -> None:
    """reward=llm_judge can fail to rate a response (NaN): the mean reward is over the rated ones, the count of
    failures is kept, and responses.jsonl holds null for it (strict JSON has no NaN), never 0."""
    from rrhf import reward

    class HalfRated(reward.Scorer):  # records as LLMJudgeScorer keeps them: no score for a failed rating
        def score_records(self, texts: list[str]) -> list[dict]:
            return [{"score": None if "fails" in t else 1.0} for t in texts]

    monkeypatch.setattr(reward, "build_scorer", lambda *args, **kwargs: HalfRated())
    metrics = _evaluate_chosen(tmp_path, [ROW, {**ROW, "chosen": "this one fails"}, {**ROW, "chosen": "fine"}])
    assert metrics["reward"] == 1.0 and metrics["reward_failed"] == 1
    responses = [json.loads(line) for line in (Path(metrics["artifact"]) / "responses.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in responses] == [1.0, None, 1.0]


# ----- item 5: run folders -----


def test_run_folder_names_are_injective_and_one_folder_deep() -> None:
    a, b = "sampling.train_file=/d/a_b/t.jsonl", "sampling.train_file=/d/a/b_t.jsonl"
    assert a.replace("/", "_") == b.replace("/", "_")  # what used to make them share a folder
    assert dirname_safe(a) != dirname_safe(b)
    for text in (a, b, "../../x", "..", ".", "a/../../b"):
        name = dirname_safe(text)
        assert "/" not in name and name not in (".", "..", "")
    assert dirname_safe("..") != dirname_safe(".") != dirname_safe("__")
    # Names that needed no change keep their old folder.
    assert dirname_safe("sampling=DP,seed=1") == "sampling=DP,seed=1" and dirname_safe("") == ""
    long = "x" * 300
    assert dirname_safe(long) != dirname_safe(long[:-1] + "/")


def _run(tmp: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "RRHF_CACHE": str(tmp / "cache"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "HF_MODULES_CACHE": str(tmp / "hf_modules"),
        **(env or {}),
    }
    full_env.pop("RRHF_CRASH_AT", None)
    cmd = [
        sys.executable,
        "run.py",
        *args,
        f"paths.artifacts={tmp}/artifacts",
        f"paths.results={tmp}/results",
        f"paths.tables={tmp}/tables",
    ]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def test_a_name_cannot_write_outside_the_results_folder(tmp_path: Path) -> None:
    inner = tmp_path / "deep" / "inner"
    inner.mkdir(parents=True)
    # task.train_size=0 is refused at start-up: only Hydra's run folder and the FAILED marker are written.
    result = _run(inner, "experiment=smoke", "name=../../x", "task.train_size=0")
    assert result.returncode != 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(inner / "results") for p in written), written
    (failed,) = (inner / "results").rglob("FAILED")
    assert failed.parent.parent.parent == inner / "results"  # results/<name>/<overrides>/


def test_overrides_that_sanitise_alike_get_their_own_folders(tmp_path: Path) -> None:
    files = [tmp_path / "d" / "a_b" / "t.jsonl", tmp_path / "d" / "a" / "b_t.jsonl"]
    result = _run(
        tmp_path, "-m", "experiment=smoke", "name=pair", "sampling=file", f"sampling.train_file={files[0]},{files[1]}"
    )  # neither exists: refused at start-up
    assert result.returncode != 0
    failed = sorted((tmp_path / "results" / "pair").glob("*/FAILED"))
    assert len(failed) == 2, failed
    assert {str(f) for f in files} == {
        OmegaConf.load(p.parent / ".hydra" / "config.yaml").sampling.train_file for p in failed
    }


# ----- item 7 -----

CUSTOM_CODE = {
    "configuration_custom.py": "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n"
    "    model_type = 'rrhf_custom'\n",
    "modeling_custom.py": "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig"
    "\n\n\nclass CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n",
}


@pytest.mark.slow
def test_remote_code_is_trusted_by_training_too(tiny: str, tmp_path: Path) -> None:
    """A model whose code comes with its weights runs through every stage with model.trust_remote_code=true:
    sampling and evaluation honoured it already, training now too."""
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(tiny, model)
    for name, code in CUSTOM_CODE.items():
        (model / name).write_text(code)
    config = json.loads((model / "config.json").read_text())
    config |= {
        "model_type": "rrhf_custom",
        "architectures": ["CustomModel"],
        "auto_map": {
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomModel",
        },
    }
    (model / "config.json").write_text(json.dumps(config))
    result = _run(tmp_path, "experiment=smoke", f"model.path={model}", "model.trust_remote_code=true", "collate=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "artifacts" / "train").glob("*/model/model.safetensors"))


# ----- issue 26: collation, run folders and output paths -----


def _finished_run(folder: Path, *overrides: str, metrics: str | None = None) -> None:
    """A run folder as run.py leaves it: the resolved config and metrics.json (made-up numbers unless given)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        OmegaConf.set_struct(cfg, False)
        del cfg["hydra"]
        OmegaConf.resolve(cfg)
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    evaluated = {"reward": 0.5, "ppl_paper": 10.0, "ppl_exact": 12.0, "artifact": f"{folder}/eval"}
    made_up = {
        "initial": {**evaluated, "reward": 0.1, "artifact": "initial"},
        "final": evaluated,
        "samples": {"all": {"mean": 0.0, "std": 1.0, "max": 2.0}},
    }
    (folder / "metrics.json").write_text(json.dumps(made_up) if metrics is None else metrics)


def _table6(tables: Path):
    import pandas as pd

    return pd.read_csv(tables / "table6.csv").set_index("row")


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"initial": {"reward": 0.1, "artifact": "a"}, "fin', "not valid JSON (line 1, column 47"),
        ("[]", "expected a JSON object, got list"),
        ("{}", "no 'initial' evaluation"),
        (
            json.dumps({"initial": {"reward": "high", "artifact": "a"}, "final": {"artifact": "b"}}),
            "'initial.reward': 'high' is not a number",
        ),
        (
            json.dumps({"initial": {"artifact": "a"}, "final": {"artifact": "b"}, "samples": {"all": [1]}}),
            "'samples.all': expected an object with numbers",
        ),
    ],
    ids=["truncated", "a_list", "empty", "a_string_number", "bad_samples"],
)
def test_a_bad_metrics_file_is_a_failed_run_and_the_others_are_collated(
    content: str, reason: str, tmp_path: Path
) -> None:
    from rrhf.tables import collate

    results, tables = tmp_path / "results", tmp_path / "tables"
    _finished_run(results / "good", "sampling=DP")
    _finished_run(results / "bad", "sampling=BP", metrics=content)
    collate(results, tables)
    table6 = _table6(tables)
    assert table6.loc["alpaca-DP", "Reward ours"] == 0.5 and math.isnan(table6.loc["alpaca-BP", "Reward ours"])
    report = (tables / "missing.txt").read_text()
    assert f"{results / 'bad'}: {results / 'bad' / 'metrics.json'}: {reason}" in report, report
    with pytest.raises(SystemExit, match=" 1 failed runs"):
        collate(results, tables, strict=True)


def test_a_failed_runs_reason_is_its_error_not_the_tracebacks_last_line(tmp_path: Path) -> None:
    import traceback

    import yaml

    from rrhf.tables import collate

    folder = tmp_path / "results" / "p"
    _finished_run(folder, "sampling=P")
    (folder / "metrics.json").unlink()
    try:
        yaml.safe_load("models:\n  gpt2: a: b\n")
    except yaml.YAMLError:
        (folder / "FAILED").write_text(traceback.format_exc())  # its last line is a "^" under the column
    collate(tmp_path / "results", tmp_path / "tables")
    (line,) = [x for x in (tmp_path / "tables" / "missing.txt").read_text().splitlines() if x.startswith(str(folder))]
    assert "ScannerError: mapping values are not allowed here" in line and not line.endswith("^"), line


def test_collating_a_results_folder_that_is_not_there_keeps_the_tables(tmp_path: Path) -> None:
    from rrhf.tables import main

    results, tables = tmp_path / "results", tmp_path / "tables"
    _finished_run(results / "dp", "sampling=DP")
    main([str(results), "--out", str(tables)])
    before = {p.name: p.read_bytes() for p in tables.iterdir() if p.is_file()}
    wrongs = ((tmp_path / "typo_results", "no such folder"), (results / "dp" / "metrics.json", "not a folder"))
    for wrong, why in wrongs:
        for strict in ([], ["--strict"]):
            with pytest.raises(SystemExit) as exit:
                main([str(wrong), "--out", str(tables), *strict])
            assert f"{wrong}: {why}" in str(exit.value.code)  # a message: exit status 1
    assert {p.name: p.read_bytes() for p in tables.iterdir() if p.is_file()} == before


def test_tables_are_not_replaced_by_emptier_ones_unless_forced(tmp_path: Path) -> None:
    import shutil

    from rrhf.tables import CollateError, collate, main

    results, tables = tmp_path / "results", tmp_path / "tables"
    _finished_run(results / "dp", "sampling=DP")
    _finished_run(results / "bp", "sampling=BP")
    collate(results, tables)
    before = (tables / "table6.csv").read_bytes()
    shutil.rmtree(results / "bp")
    with pytest.raises(CollateError) as error:
        collate(results, tables)
    message = str(error.value)
    assert f"{tables}: not replaced" in message and "--force" in message
    assert re.search(r"table6 \((\d+) filled cells -> (\d+)\)", message), message
    with pytest.raises(SystemExit, match="--force"):
        main([str(results), "--out", str(tables)])
    assert (tables / "table6.csv").read_bytes() == before
    main([str(results), "--out", str(tables), "--force"])
    assert math.isnan(_table6(tables).loc["alpaca-BP", "Reward ours"])
    collate(results, tables)  # as many filled cells as before: replaced


def test_collation_after_a_run_is_a_warning_not_a_failure(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from rrhf.tables import collate_after_runs

    _finished_run(tmp_path / "results" / "dp", "sampling=DP")
    tables = tmp_path / "tables"
    tables.write_text("")  # a file where the tables go
    with caplog.at_level(logging.WARNING, logger="rrhf.tables"):
        collate_after_runs(tmp_path / "results", tables)  # does not raise
    assert f"the tables in {tables} were not collated: {tables}: not a folder" in caplog.text


def test_a_rerun_with_another_launch_shape_keeps_the_finished_run(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "smoke"  # experiment=smoke without other overrides
    _finished_run(folder)
    (folder / "launch.json").write_text(json.dumps({"world_size": 2}))
    finished = (folder / "metrics.json").read_bytes()
    result = _run(tmp_path, "experiment=smoke")
    assert result.returncode != 0
    assert f"{folder}: holds a finished run of a 2-process launch" in result.stderr, result.stderr[-3000:]
    assert "this launch has 1 process(es)" in result.stderr and "--nproc-per-node=2" in result.stderr
    assert "Traceback" not in result.stderr
    assert (folder / "metrics.json").read_bytes() == finished
    assert not (folder / "FAILED").exists() and not (folder / "STARTED").exists()  # still a finished run


def test_a_results_path_that_is_a_file_is_refused_before_hydra_makes_the_run_folder(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "RRHF_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            "run.py",
            "experiment=smoke",
            f"paths.results={taken}",
            f"paths.artifacts={tmp_path}/artifacts",
            f"paths.tables={tmp_path}/tables",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"rrhf: paths.results='{taken}': is a file, not a folder" in result.stderr
