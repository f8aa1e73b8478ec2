"""Table 3 wired into the harness: the experiments compose, the `sheets` stage builds blind sheets from finished
runs (and only once), and the reward model judges them into table3_reward_model.*."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.runs import TINY_SWEEP
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import rrhf  # noqa: F401  (registers the config resolvers)
from rrhf.humaneval import runs as table3_runs
from rrhf.humaneval.__main__ import main as cli
from rrhf.humaneval.runs import (
    judge_with_llm,
    judge_with_reward,
    label,
    settings_of,
    sheets_from_runs,
    sheets_stage,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
ROOT = CONF.parent

# VADER: 0.82, 0.0, -0.81, 0.42, -0.73.
LOVED, PLAIN, HATED, LIKED, AWFUL = (
    "I loved it, a wonderful film.",
    "It was a film.",
    "I hated it, a terrible film.",
    "I liked it.",
    "A terrible, awful film.",
)
VADER = {LOVED: 0.8225, PLAIN: 0.0, HATED: -0.8074, LIKED: 0.4215, AWFUL: -0.7269}
PROMPTS = [f"Review {i}: the film" for i in range(12)]
SETTINGS = {"shared": 3, "annotators": 3, "seed": 0}


def _plain(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
        return plain | {
            "sweep": OmegaConf.to_container(cfg.hydra.sweeper.params),
            "callbacks": OmegaConf.to_container(cfg.hydra.callbacks),
        }


def test_experiments_compose_with_the_papers_design() -> None:
    paper = _plain(["experiment=table3"])
    assert (paper["model"]["name"], paper["task"]["name"]) == ("alpaca", "hh")
    assert paper["reward"]["name"] == "gptj_rm_static"
    assert paper["sweep"] == {"table3_arms": "rrhf_dp,ppo,ip2"} and "table3" in paper["callbacks"]
    t3 = paper["table3"]
    assert (t3["pairs_per_comparison"], t3["shared"], t3["annotators"]) == (110, 30, 3)
    assert [(c["evaluated"], c["versus"]) for c in t3["comparisons"]] == [
        ("rrhf_dp", "dataset_chosen"),
        ("rrhf_dp", "ppo"),
        ("rrhf_dp", "rrhf_ip2"),
    ]
    ppo = _plain(["experiment=table3", "table3_arms=ppo"])
    assert ppo["method"]["name"] == "ppo" and ppo["method"]["ppo"]["iterations"] == 156  # trlX's ppo_hh budget
    ip2 = _plain(["experiment=table3", "table3_arms=ip2"])
    assert (ip2["method"]["name"], ip2["sampling"]["name"]) == ("rrhf", "IP-2")

    offline = _plain(["experiment=offline/table3"])
    assert offline["sweep"] == {"findings": "rrhf_dp,ppo,ip2", "seed": "1"}
    assert offline["table3"]["arm_group"] == "findings" and offline["model"]["name"] == "smollm2"
    # Every arm composes as experiment=findings' arm of that name: the two sweeps share every artifact.
    for arm in ("rrhf_dp", "ppo", "ip2"):
        ours, theirs = (
            _plain([f"experiment={e}", f"findings={arm}", "seed=1"]) for e in ("offline/table3", "findings")
        )
        drop = ("name", "table3", "sweep", "callbacks")
        assert {k: v for k, v in ours.items() if k not in drop} == {k: v for k, v in theirs.items() if k not in drop}
    judged = _plain(["experiment=offline/table3", "judge=reward_model"])
    assert judged["judge"] == {"name": "reward_model"}
    llm = _plain(["experiment=offline/table3", "judge=llm"])["judge"]
    assert llm["name"] == "llm" and llm["base_url"] is None and llm["template"] == "single_letter"


def _run(
    results: Path, arm: str, responses: list[str], *, dataset: bool = False, seed: int = 1, prompts: list[str] = PROMPTS
) -> None:
    """A finished run as the pipeline leaves it: .hydra/, metrics.json naming its evaluation artifacts."""
    folder = results / f"findings={arm},seed={seed}"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      findings: {arm}\n")
    (folder / ".hydra" / "config.yaml").write_text(f"seed: {seed}\ndevice: cpu\ndtype: auto\nreward:\n  name: vader\n")
    store = results.parent.parent / "artifacts" / "evaluate"

    def artifact(name: str, texts: list[str]) -> str:
        where = store / f"{name}-{seed}"
        where.mkdir(parents=True)
        with open(where / "responses.jsonl", "w") as handle:
            for p, r in zip(prompts, texts):  # the evaluation stage's reward: VADER's
                handle.write(json.dumps({"prompt": p, "response": r, "reward": VADER[r]}) + "\n")
        (where / "DONE").write_text("")
        return str(where)

    metrics = {"final": {"artifact": artifact(arm, responses)}}
    if dataset:
        metrics["dataset"] = {
            "chosen": {"artifact": artifact("chosen", [PLAIN] * len(prompts))},
            "rejected": {"artifact": artifact("rejected", [HATED] * len(prompts))},
        }
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    results = tmp_path / "results" / "offline_table3"
    _run(results, "rrhf_dp", [LOVED] * 12, dataset=True)
    _run(results, "ppo", [LOVED if i % 2 == 0 else AWFUL for i in range(12)])  # even prompts: identical to RRHF's
    _run(results, "ip2", [LIKED] * 12)
    return results


def test_sheets_from_finished_runs(sweep: Path, capsys) -> None:
    copy = sheets_from_runs(sweep, settings=settings_of(SETTINGS))
    assert copy.parent == sweep / "table3"
    key = json.loads((copy / "key.json").read_text())
    assert copy.name == key["sheet_id"] and "built" in capsys.readouterr().out
    design = json.loads((copy / "design.json").read_text())
    assert design["pairs_per_comparison_asked"] == 110 and design["pairs_per_comparison"] == 12  # capped
    assert [c["name"] for c in key["comparisons"]] == [
        "rrhf_dp-vs-good_responses",
        "rrhf_dp-vs-ppo",
        "rrhf_dp-vs-rrhf_ip2",
    ]
    assert len(key["items"]) == 36 and sum(i["identical"] for i in key["items"].values()) == 6  # PPO's even prompts
    for item in key["items"].values():
        ours = item[item["evaluated_shown_as"]]
        assert ours["system"] == "rrhf_dp" and ours["source"]["run_key"] == "offline_table3/findings=rrhf_dp,seed=1"
        assert ours["source"]["artifact"] == "evaluate/rrhf_dp-1/responses.jsonl"
        other = item["B" if item["evaluated_shown_as"] == "A" else "A"]
        if other["system"] == "dataset_chosen":  # read from the evaluated arm's run
            assert other["source"]["run_key"].endswith("findings=rrhf_dp,seed=1")
            assert other["source"]["artifact"] == "evaluate/chosen-1/responses.jsonl"
        assert PROMPTS[ours["source"]["line"]] == PROMPTS[item["prompt_index"]]
    for name in key["annotators"]:
        sheet = json.loads((copy / "annotators" / f"{name}.json").read_text())
        assert (copy / "annotators" / f"{name}.html").exists()
        assert "rrhf" not in json.dumps(sheet).lower() and "findings" not in json.dumps(sheet)  # blind
        for item in sheet["items"]:  # the prompt's responses, whichever system each is
            assert {item["response_a"], item["response_b"]} <= {LOVED, PLAIN, AWFUL, LIKED}


def test_sheets_stage_is_cached(sweep: Path, monkeypatch) -> None:
    settings = settings_of(SETTINGS)
    runs = table3_runs.table3_runs(sweep, settings)
    folder, built = sheets_stage(runs, settings)
    assert built and (folder / "DONE").exists()

    def refuse(*args, **kwargs):
        raise AssertionError("the second call drew the sheets again")

    monkeypatch.setattr(table3_runs, "build_sheets", refuse)
    again, built = sheets_stage(runs, settings)
    assert again == folder and not built
    # The judge's margin does not shape the sheets; the design does.
    assert sheets_stage(runs, settings | {"reward_margin": 0.3})[0] == folder
    monkeypatch.undo()
    other, built = sheets_stage(runs, settings | {"seed": 1})
    assert built and other != folder


def test_shared_pairs_are_capped_at_half_of_what_is_drawn(sweep: Path, caplog) -> None:
    # 3 comparisons x 12 test prompts = 36 drawn: the paper's 30 shared pairs would leave 6 to score; 18 are shared.
    copy = sheets_from_runs(sweep, settings=settings_of(SETTINGS | {"shared": 30}))
    assert json.loads((copy / "design.json").read_text())["shared"] == 18
    assert "30 shared pairs asked of 36 drawn: sharing 18" in caplog.text
    key = json.loads((copy / "key.json").read_text())
    shown = [i for i in key["items"].values() if not i["identical"]]
    assert 0 < sum(i["shared"] for i in shown) <= 18 < len(key["items"])


def test_runs_must_answer_the_same_prompts(tmp_path: Path) -> None:
    results = tmp_path / "results" / "offline_table3"
    _run(results, "rrhf_dp", [LOVED] * 12, dataset=True)
    _run(results, "ppo", [LOVED] * 12, prompts=[p + "!" for p in PROMPTS])
    _run(results, "ip2", [LIKED] * 12)
    with pytest.raises(ValueError, match="ppo .* has no response to a test prompt"):
        sheets_from_runs(results, settings=settings_of(SETTINGS))
    with pytest.raises(FileNotFoundError, match="no finished run of findings=op "):
        sheets_from_runs(
            results,
            settings=settings_of(SETTINGS | {"systems": {"rrhf_dp": "rrhf_dp", "ppo": "op", "rrhf_ip2": "ip2"}}),
        )


def test_label_rule() -> None:
    assert label(0.8, 0.1, 0.0) == "A" and label(0.1, 0.8, 0.0) == "B" and label(0.5, 0.5, 0.0) == "tie"
    assert label(0.5, 0.3, 0.2) == "tie" and label(0.5, 0.29, 0.2) == "A"


def test_reward_model_judge_on_vader(sweep: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    settings = settings_of(SETTINGS)
    copy = sheets_from_runs(sweep, settings=settings)
    table = judge_with_reward(sweep, copy, tmp_path / "tables", settings)
    rows = {r.comparison: r.counts for r in table.rows}
    # 12 pairs per comparison, 1 of each shared (kept for agreement): 11 scored.
    assert rows["rrhf_dp-vs-good_responses"] == {"win": 11, "tie": 0, "lose": 0}
    assert rows["rrhf_dp-vs-ppo"] == {"win": 5, "tie": 6, "lose": 0}  # the 6 identical pairs are ties
    assert rows["rrhf_dp-vs-rrhf_ip2"] == {"win": 11, "tie": 0, "lose": 0}
    assert not table.human and table.judge == "reward model vader"
    labels = json.loads((copy / "labels" / "reward_model" / "annotator-1.json").read_text())
    assert labels["judge"] == "reward model vader" and set(labels) == {"sheet_id", "annotator", "judge", "labels"}
    out = tmp_path / "tables"
    assert {p.name for p in out.iterdir()} == {
        f"table3_reward_model{s}" for s in (".tex", ".csv", ".md", ".json", "_vs_paper.tex", "_accuracy.json")
    }
    tex = (out / "table3_reward_model.tex").read_text()
    assert "automatic judge" in tex and "tab:table3-reward-model" in tex and "Judged by human" not in tex
    accuracy = json.loads((out / "table3_reward_model_accuracy.json").read_text())
    assert (accuracy["pairs"], accuracy["chosen_higher"], accuracy["tie"]) == (12, 1.0, 0.0)
    assert "paper" not in accuracy  # VADER is not the paper's reward model
    printed = capsys.readouterr().out
    assert "chosen higher 100.0%" in printed and "table3_reward_model.md" in printed

    # A wide margin: what VADER separates by less is a tie (LOVED - LIKED = 0.40, LOVED - PLAIN = 0.82). The
    # scores are a cached stage: a new margin scores nothing again.
    import rrhf.reward

    monkeypatch.setattr(rrhf.reward, "build_scorer", lambda *a, **k: pytest.fail("the pairs were scored again"))
    wide = judge_with_reward(sweep, copy, tmp_path / "wide", settings, margin=0.5)
    rows = {r.comparison: r.counts for r in wide.rows}
    assert rows["rrhf_dp-vs-rrhf_ip2"] == {"win": 0, "tie": 11, "lose": 0}
    assert rows["rrhf_dp-vs-good_responses"] == {"win": 11, "tie": 0, "lose": 0}


def _shown(body: dict) -> tuple[str, str]:
    # The two responses as the single-letter template shows them.
    user = body["messages"][1]["content"]
    return user.split("Answer A:\n")[1].split("\n\nAnswer B:")[0], user.split("Answer B:\n")[1].split("\n\n")[0]


def test_llm_judge_through_an_endpoint(sweep: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from rrhf.judging import ChatClient

    sent: list[dict] = []

    def endpoint(self, body: dict) -> dict:
        # A judge that prefers the higher VADER score and writes no verdict when IP-2's response is shown.
        sent.append(body)
        a, b = _shown(body)
        text = "Hmm" if LIKED in (a, b) else ("C" if VADER[a] == VADER[b] else "A" if VADER[a] > VADER[b] else "B")
        return {"choices": [{"message": {"content": text}, "finish_reason": "length"}]}

    monkeypatch.setattr(ChatClient, "_post", endpoint)
    settings = settings_of(SETTINGS)
    copy = sheets_from_runs(sweep, settings=settings)
    judge = {"base_url": "http://judge.invalid/v1", "model": "m", "cache": str(tmp_path / "cache")}
    table = judge_with_llm(sweep, copy, tmp_path / "tables", settings, judge)
    rows = {r.comparison: r.counts for r in table.rows}
    assert rows["rrhf_dp-vs-good_responses"] == {"win": 11, "tie": 0, "lose": 0}
    assert rows["rrhf_dp-vs-ppo"] == {"win": 5, "tie": 6, "lose": 0}
    assert rows["rrhf_dp-vs-rrhf_ip2"] == {"win": 0, "tie": 0, "lose": 0}  # all unparsed
    assert table.unparsed == 11 + 3  # the scored pairs, and the shared one once per annotator
    assert table.judge == "LLM judge m (single_letter@v1)" and not table.human
    assert all(b["max_tokens"] == 2 and b["temperature"] == 0.0 for b in sent)
    # 12 + 11 + 12 shown pairs (6 identical ones are never shown) and 12 test pairs, in both orders.
    assert len(sent) == 2 * (12 + 6 + 12 + 12)
    out = tmp_path / "tables"
    assert {p.name for p in out.iterdir()} == {
        f"table3_llm{s}" for s in (".tex", ".csv", ".md", ".json", "_vs_paper.tex", "_accuracy.json")
    }
    tex = (out / "table3_llm.tex").read_text()
    assert "automatic judge" in tex and "tab:table3-llm" in tex and "Judged by human" not in tex
    assert "14 labels without a readable verdict (unparsed) are left out" in (out / "table3_llm.md").read_text()
    unparsed = json.loads((copy / "labels" / "llm" / "unparsed.json").read_text())["items"]
    assert len(unparsed) == 12 and all(u["raw_ab"] == "Hmm" and u["label"] is None for u in unparsed.values())
    labels = json.loads((copy / "labels" / "llm" / "annotator-1.json").read_text())
    assert set(labels["labels"].values()) <= {"A", "B", "tie", "unparsed"} and "unparsed" in labels["labels"].values()
    accuracy = json.loads((out / "table3_llm_accuracy.json").read_text())
    assert (accuracy["pairs"], accuracy["chosen_preferred"], accuracy["unparsed"]) == (12, 1.0, 0.0)
    assert accuracy["template"] == "single_letter@v1" and accuracy["max_tokens"] == 2
    assert "chosen preferred 100.0%" in capsys.readouterr().out

    # A rerun is answered by the cache alone.
    monkeypatch.setattr(ChatClient, "_post", lambda self, body: pytest.fail("the judge was asked again"))
    again = judge_with_llm(sweep, copy, tmp_path / "again", settings, judge)
    assert [r.counts for r in again.rows] == [r.counts for r in table.rows]


def test_callback_dispatches_on_the_judge(sweep: Path, tmp_path: Path, monkeypatch) -> None:
    called: list[str] = []
    monkeypatch.setattr(table3_runs, "judge_with_reward", lambda *a: called.append("reward_model"))
    monkeypatch.setattr(table3_runs, "judge_with_llm", lambda *a: called.append(f"llm:{a[4].template}"))
    for judge in ({"name": "reward_model"}, {"name": "llm", "template": "mt_bench_pair"}, None):
        config = OmegaConf.create(
            {"hydra": {"sweep": {"dir": str(sweep)}}, "table3": SETTINGS, "paths": {"tables": str(tmp_path)}}
        )
        if judge is not None:
            config.judge = judge
        table3_runs.Table3Callback().on_multirun_end(config)
    assert called == ["reward_model", "llm:mt_bench_pair"]
    config.judge = {"name": "oracle"}
    with pytest.raises(ValueError, match="judge=oracle"):
        table3_runs.Table3Callback().on_multirun_end(config)


@pytest.mark.slow
def test_llm_judge_through_the_local_server(tmp_path: Path, monkeypatch) -> None:
    """judge.base_url null: the embedded SmolLM2 served by `transformers serve` judges a one-prompt sheet
    (3 pairs) and the test pair; a rerun starts no server and sends nothing."""
    pytest.importorskip("fastapi", reason="the local judge server needs the `judge` extra")
    pytest.importorskip("uvicorn", reason="the local judge server needs the `judge` extra")
    import rrhf.judging

    results = tmp_path / "results" / "offline_table3"
    prompt = PROMPTS[:1]
    _run(results, "rrhf_dp", [LOVED], dataset=True, prompts=prompt)
    _run(results, "ppo", [AWFUL], prompts=prompt)
    _run(results, "ip2", [LIKED], prompts=prompt)
    settings = settings_of({"shared": 0, "annotators": 1, "seed": 0})
    copy = sheets_from_runs(results, settings=settings)
    judge = {"cache": str(tmp_path / "cache")}  # the rest: conf/judge/llm.yaml's defaults
    table = judge_with_llm(results, copy, tmp_path / "tables", settings, judge)
    assert table.judge.startswith("LLM judge embedded:smollm2@") and table.judge.endswith("(single_letter@v1)")
    assert sum(r.scored for r in table.rows) + table.unparsed == 3
    tex = (tmp_path / "tables" / "table3_llm.tex").read_text()
    assert "an automatic judge (not human annotators)" in tex and "Judged by human" not in tex
    accuracy = json.loads((tmp_path / "tables" / "table3_llm_accuracy.json").read_text())
    parts = ("chosen_preferred", "tie", "rejected_preferred", "unparsed")
    assert accuracy["pairs"] == 1 and sum(accuracy[k] for k in parts) == pytest.approx(1.0)

    monkeypatch.setattr(rrhf.judging, "local_server", lambda *a, **k: pytest.fail("a server was started again"))
    from rrhf.judging import ChatClient

    monkeypatch.setattr(ChatClient, "_post", lambda self, body: pytest.fail("the judge was asked again"))
    again = judge_with_llm(results, copy, tmp_path / "again", settings, judge)
    assert [r.counts for r in again.rows] == [r.counts for r in table.rows] and again.unparsed == table.unparsed


def test_command_line(sweep: Path, tmp_path: Path, capsys) -> None:
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml({"table3": SETTINGS}))  # what the sweep ran with
    assert cli(["sheets-from-runs", str(sweep), "--out", str(tmp_path / "sheets")]) == 0
    out = capsys.readouterr().out
    assert "key (keep it from the annotators)" in out and "annotator-3.html" in out
    assert cli(["judge-reward-model", str(sweep), "--out", str(tmp_path / "tables")]) == 0
    assert (tmp_path / "tables" / "table3_reward_model.md").exists()
    assert cli(["sheets-from-runs", str(tmp_path / "nothing")]) == 2
    assert "no finished run" in capsys.readouterr().err


@pytest.mark.slow
def test_offline_table3_sweep_on_the_tiny_model(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "RRHF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "run.py",
        "experiment=offline/table3",
        "judge=reward_model",
        *TINY_SWEEP,
        "trainer.args.max_steps=3",
        "findings_scale.ppo_iterations=2",
        "table3.shared=3",
        f"paths.artifacts={tmp_path}/artifacts",
        f"paths.results={tmp_path}/results",
        f"paths.tables={tmp_path}/tables",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = tmp_path / "results" / "offline_table3"
    runs = {OmegaConf.load(h).hydra.runtime.choices.findings: h.parent.parent for h in sweep.rglob(".hydra/hydra.yaml")}
    assert sorted(runs) == ["ip2", "ppo", "rrhf_dp"]
    assert not any("reward_model" in folder.name for folder in runs.values())  # the judge changes no run
    (copy,) = (sweep / "table3").iterdir()
    key = json.loads((copy / "key.json").read_text())
    assert len(key["items"]) == 12 and all((copy / "annotators" / f"{a}.html").exists() for a in key["annotators"])
    table = json.loads((tmp_path / "tables" / "table3_reward_model.json").read_text())
    assert table["judge"] == "reward model vader" and not table["human"]
    # 4 prompts per comparison; the shared ones are kept for agreement, not scored.
    assert sum(sum(r["counts"].values()) for r in table["rows"]) == 12 - key["counts"]["shared"]
    accuracy = json.loads((tmp_path / "tables" / "table3_reward_model_accuracy.json").read_text())
    assert accuracy["pairs"] == 4 and 0 <= accuracy["chosen_higher"] <= 1
    assert f"table3: sheet {key['sheet_id']}" in result.stdout
