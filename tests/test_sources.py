"""sampling=sources (rrhf.sources): candidates from a local policy, an OpenAI-compatible endpoint, a file and the data
set, each source its own artifact; the training file says which source wrote each candidate; adding a source reuses
the others. Also the Alpaca task's rows and the Wombat table (rrhf.tables.wombat_table)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fixtures.endpoint import completion

from rrhf.config_checks import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp: Path, *overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import rrhf  # noqa: F401  (registers the config resolvers)
    from rrhf.config_checks import check_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["experiment=smoke", "sampling=sources", f"paths.artifacts={tmp}/artifacts", *overrides],
            return_hydra_config=True,
        )
        HydraConfig.instance().set_config(cfg)
    check_config(cfg, launch=False)
    return cfg


@pytest.fixture
def answering_stub(stub):
    """An endpoint that answers every chat request with a text naming the request's number."""

    def reply(body: dict) -> tuple[int, dict, dict]:
        return 200, {}, completion(f"an endpoint answer to: {body['messages'][-1]['content'][:20]}")

    return stub(reply)


def test_sources_build_one_group_each_and_adding_a_source_reuses_the_others(
    answering_stub, tmp_path: Path, monkeypatch
) -> None:
    from rrhf.data import load_split, read_jsonl
    from rrhf.pipeline import score_stage

    monkeypatch.setenv("RRHF_CACHE", str(tmp_path / "cache"))
    state, url = answering_stub
    rows = load_split(ROOT / "data" / "imdb_offline", "train", limit=8)
    given = tmp_path / "given.jsonl"
    given.write_text(
        "".join(json.dumps({"query": r["prompt"], "responses": [f"file {i}"]}) + "\n" for i, r in enumerate(rows))
    )
    four = [
        f"+sampling.sources.served={{kind: endpoint, base_url: '{url}', model: stub, n: 2, api_key_env: null}}",
        f"+sampling.sources.given={{kind: file, path: '{given}'}}",
    ]
    folder = score_stage(_cfg(tmp_path, *four), "embedded:tiny", None)
    train = read_jsonl(folder / "train.jsonl")
    assert len(train) == 8 and len(state.seen) == 16  # 8 prompts x n=2, each its own request
    assert all(r["sources"] == ["policy", "chosen", "served", "served", "given"] for r in train)
    assert all(
        r["responses"][1] == row["chosen"] and r["responses"][4] == f"file {i}"
        for i, (r, row) in enumerate(zip(train, rows))
    )
    assert train[0]["responses"][2].startswith("an endpoint answer to:")
    stats = json.loads((folder / "stats.json").read_text())
    assert set(stats["sources"]) == {"policy", "chosen", "served", "given"} and "all" in stats
    built = {
        p.parent.name: p.stat().st_mtime_ns
        for stage in ("sample", "source")
        for p in (tmp_path / "artifacts" / stage).glob("*/DONE")
    }
    assert len(built) == 3  # the policy's sample artifact, the endpoint's and the file's

    # A fifth source: the other four are read from their artifacts, nothing is asked or sampled again.
    again = score_stage(
        _cfg(tmp_path, *four, "+sampling.sources.rejected={kind: dataset, field: rejected}"), "embedded:tiny", None
    )
    assert again != folder and len(state.seen) == 16
    after = {
        p.parent.name: p.stat().st_mtime_ns
        for stage in ("sample", "source")
        for p in (tmp_path / "artifacts" / stage).glob("*/DONE")
    }
    assert after == built
    assert read_jsonl(again / "train.jsonl")[0]["sources"][-1] == "rejected"
    # A source set to null is left out.
    dropped = score_stage(_cfg(tmp_path, *four, "sampling.sources.chosen=null"), "embedded:tiny", None)
    assert read_jsonl(dropped / "train.jsonl")[0]["sources"] == ["policy", "served", "served", "given"]


def test_a_file_source_must_cover_every_prompt(tmp_path: Path, monkeypatch) -> None:
    from rrhf.pipeline import score_stage

    monkeypatch.setenv("RRHF_CACHE", str(tmp_path / "cache"))
    given = tmp_path / "given.jsonl"
    given.write_text(json.dumps({"query": "another prompt", "responses": ["x"]}) + "\n")
    cfg = _cfg(tmp_path, "sampling.sources.policy=null", f"+sampling.sources.given={{kind: file, path: '{given}'}}")
    with pytest.raises(ValueError, match=r"sampling.sources.given.path=.*no line for 8 of 8 prompts"):
        score_stage(cfg, "embedded:tiny", None)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+sampling.sources.x={kind: shop}", r"sampling.sources.x.kind='shop': expected one of policy"),
        ("+sampling.sources.x={kind: policy}", r"sampling.sources.x.generator: a policy source needs its generator"),
        ("+sampling.sources.x={kind: endpoint, model: m, n: 0}", r"sampling.sources.x.n=0"),
        (
            "+sampling.sources.x={kind: endpoint, model: m, speed: 3}",
            r"sampling.sources.x: unknown key\(s\) \['speed'\]",
        ),
        ("+sampling.sources.x={kind: dataset, field: best}", r"sampling.sources.x.field='best'"),
        ("+sampling.sources.x={kind: policy, generator: beam, num_candidates: 9}", r"num_candidates=9"),
        ("+sampling.refresh_steps=2", r"sampling.refresh_steps=2: online refreshes re-sample one policy"),
    ],
)
def test_config_refuses_bad_sources(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, override)


def test_alpaca_rows_hold_out_the_last_rows_in_alpacas_template(tmp_path: Path) -> None:
    from rrhf.data import alpaca_rows

    raw = [{"instruction": f"Do {i}.", "input": "with this" if i % 2 else "", "output": f"done {i}"} for i in range(5)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    train, test = (alpaca_rows(str(tmp_path), split, test_size=2) for split in ("train", "test"))
    assert [r["chosen"] for r in train] == ["done 0", "done 1", "done 2"] and [r["chosen"] for r in test] == [
        "done 3",
        "done 4",
    ]
    assert train[0]["prompt"].endswith("### Instruction:\nDo 0.\n\n### Response:")
    assert "### Input:\nwith this\n\n### Response:" in train[1]["prompt"]
    with pytest.raises(ValueError, match="task.test_size=5"):
        alpaca_rows(str(tmp_path), "train", test_size=5)


def test_wombat_table_sums_scores_and_gives_an_interval_over_questions(tmp_path: Path) -> None:
    from rrhf.tables import wombat_files, wombat_table

    judged = tmp_path / "judged"
    judged.mkdir()
    pairs = [(8, 6), (7, 7), (9, 5), (4, 6)]
    outcome = {1: "win", 0: "tie", -1: "lose"}
    judged.joinpath("judgements.jsonl").write_text(
        "".join(
            json.dumps({"question_id": i, "evaluated": a, "versus": b, "outcome": outcome[(a > b) - (a < b)]}) + "\n"
            for i, (a, b) in enumerate(pairs)
        )
    )
    run = tmp_path / "results" / "offline_wombat" / "run"
    run.mkdir(parents=True)
    summary = {"pairs": 4, "scored": 4, "evaluated_sum": 28, "versus_sum": 24, "win": 2, "tie": 1, "lose": 1}
    summary |= {"judge": "stub", "artifact": str(judged)}
    run.joinpath("metrics.json").write_text(
        json.dumps({"pairwise": {"questions": "q", "answers": "a", "initial": summary}})
    )
    frame = wombat_table(tmp_path / "results")
    (row,) = frame.to_dict("records")
    assert (row["versus"], row["trained sum"], row["versus sum"], row["win"]) == ("initial", 28, 24, 2)
    assert row["mean diff"] == pytest.approx(1.0) and row["95% low"] < 1.0 < row["95% high"]
    assert (row["slides row"], row["slides versus sum"], row["slides Wombat sum"]) == ("Alpaca", 567, 616)
    files = wombat_files(frame)
    assert set(files) == {"wombat.md", "wombat.tex", "wombat.csv"} and "| initial | stub |" in files["wombat.md"]
    assert not math.isnan(row["95% high"])
