"""The Hub-shaped rehearsal (README, "The Hub-shaped rehearsal"): every paper-scale experiment, end to end, against
tiny random stand-ins under the exact Hub ids and file layouts the configs name (tests/fixtures/hub.py).

Each command is run as a user on a cluster would: `python -m rrhf.hub fetch <overrides>` on the "login node"
(the stand-in Hub served over HTTP), then the job itself with HF_HUB_OFFLINE=1, at `+scale=rehearsal`, on two
CPU ranks under torchrun with the DDP profile where the experiment asks for a distributed one. The full
rehearsal is marked `rehearsal` (run by .ci/run after `make test`; `pytest -m rehearsal`); the default run keeps
one job of the user's command `python run.py -m sampling=DP,BP,P model=alpaca`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fixtures.hub import ROOT, fetch, run, subprocess_env

SCALE = ["+scale=rehearsal"]
# The profile a CPU machine runs where an experiment asks for FSDP: DDP on two ranks (the FSDP and ZeRO-3
# profiles themselves run on two CPU ranks in tests/test_distributed.py).
RANKS = ["trainer=ddp"]
# Every paper-scale command of the README and the experiment files: the sweeps and the rows they name.
COMMANDS = [
    ["experiment=table2"],
    ["experiment=table2", "method=ppo,best_of_n", "sampling=DP"],
    ["experiment=table5"],
    ["experiment=table6"],
    ["experiment=table6_alpaca"],
    ["experiment=table7"],
    ["experiment=imdb"],
    ["experiment=imdb", "sampling=imdb_B", "method=ppo", "method.ppo.target=null", "method.ppo.init_kl_coef=0.0,0.1"],
    ["experiment=alpaca_sft"],
    ["experiment=techniques_hh"],
    ["experiment=table3", "judge=reward_model"],
]


def _table(place: Path, number: int) -> list[dict]:
    import csv

    with open(place / "tables" / f"table{number}_vs_paper.csv") as handle:
        return list(csv.DictReader(handle))


def _filled(place: Path, number: int, column: str) -> dict[str, str]:
    """Row id -> the model and task that filled `column` of a table (rows without a value left out)."""
    return {r["row"]: r["ours"] for r in _table(place, number) if r["ours"] and r[f"{column} ours"] not in ("", "nan")}


@pytest.mark.slow
def test_the_users_command_runs_against_the_stand_ins_offline(stand_in_hub, tmp_path: Path) -> None:
    """`python run.py -m sampling=DP,BP,P model=alpaca` at the smallest size, one job (sampling=DP): fetched
    first, then run offline on two ranks; the lock pins every repository, the stage keys name the commits
    read, and the collated Table 6 fills the Alpaca DP row, and only the rows this run owns."""
    hub, endpoint = stand_in_hub
    fetched = fetch(tmp_path, endpoint, "model=alpaca", "sampling=DP")
    lock = yaml.safe_load((tmp_path / "hub.lock.yaml").read_text())
    assert lock["models"]["chavinlo/alpaca-native"] == hub.commit("model", "chavinlo/alpaca-native").sha
    assert set(lock["models"]) == {
        "chavinlo/alpaca-native",
        "gpt2-medium",
        "Dahoas/gptj-rm-static",
        "EleutherAI/gpt-j-6B",
        "gpt2",
    }
    assert lock["datasets"] == {"Dahoas/rm-static": hub.commit("dataset", "Dahoas/rm-static").sha}
    assert "1 job(s), 6 Hub item(s)" in fetched.stdout
    started = time.time()
    run(tmp_path, "model=alpaca", "sampling=DP", *SCALE, *RANKS)
    print(f"one job of the user's command on 2 ranks: {time.time() - started:.0f} s")
    (metrics_file,) = (tmp_path / "results").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["initial"]["num_prompts"] == 2 and "rm_accuracy_paper" in metrics["initial"]
    evaluated = json.loads((Path(metrics["initial"]["artifact"]) / "inputs.json").read_text())
    assert evaluated["policy"] == f"model:hub:chavinlo/alpaca-native@{lock['models']['chavinlo/alpaca-native']}"
    assert evaluated["eval"]["judge_id"] == f"hub:gpt2-medium@{lock['models']['gpt2-medium']}"
    assert evaluated["task"]["commit"] == lock["datasets"]["Dahoas/rm-static"]
    assert evaluated["reward"]["ids"]["checkpoint_repo"].endswith(lock["models"]["Dahoas/gptj-rm-static"])
    assert _filled(tmp_path, 6, "Mean") == {"alpaca-DP": "alpaca / hh"}
    assert set(_filled(tmp_path, 2, "Reward")) == {"good_responses", "bad_responses", "alpaca", "alpaca-rrhf-DP"}
    assert set(_filled(tmp_path, 5, "Accuracy")) == {"gptj_rm_static", "alpaca", "alpaca-rrhf-DP"}
    # Trained on 2 ranks; once the stage is done, rank 0 drops its resume state.
    (trained,) = (tmp_path / "artifacts" / "train").glob("*/DONE")
    assert not (trained.parent / "checkpoints").exists()


@pytest.mark.rehearsal
def test_every_paper_experiment_runs_end_to_end_against_the_stand_ins(stand_in_hub, tmp_path: Path) -> None:
    """Every command of COMMANDS fetched, then run offline on two ranks; the collated tables fill exactly
    the cells the runs own."""
    _, endpoint = stand_in_hub
    timings = {}
    for command in COMMANDS:
        fetch(tmp_path, endpoint, *command)
        started = time.time()
        run(tmp_path, *command, *SCALE, *RANKS)
        timings[" ".join(command)] = round(time.time() - started)
    collated = subprocess.run(
        [sys.executable, "-m", "rrhf.tables", str(tmp_path / "results"), "--out", str(tmp_path / "tables")],
        cwd=ROOT,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert collated.returncode == 0, collated.stderr[-3000:]
    print("rehearsal seconds per command:", json.dumps(timings, indent=1), "total", sum(timings.values()))
    failed = list((tmp_path / "results").rglob("FAILED"))
    assert not failed, failed[0].read_text()[-3000:]
    finished = [p.parent for p in (tmp_path / "artifacts").glob("*/*/DONE")]
    assert [p for p in finished if (p / "checkpoints").exists() or (p / "checkpoint").exists()] == []
    assert any(p.parent.name == "ppo" for p in finished)  # PPO's checkpoint went too
    missing = (tmp_path / "tables" / "missing.txt").read_text()
    gaps = [line for line in missing.splitlines() if line.startswith("Table")]
    # Only the rows no command owns: Table 10's NLPO rows are RL4LMs' numbers (not a harness method).
    assert gaps == ["Table 10, row nlpo-no_kl: no run", "Table 10, row nlpo-kl_0.1: no run"], "\n".join(gaps)
    # Table 3: the sheets and pages of the three comparisons from the Alpaca arms, labelled by the reward model.
    (sheet,) = (tmp_path / "results" / "table3" / "table3").iterdir()
    assert (sheet / "key.json").exists() and len(list(sheet.glob("annotators/*.html"))) == 3
    judged = (tmp_path / "tables" / "table3_reward_model.csv").read_text()
    for comparison in ("rrhf_dp-vs-good_responses", "rrhf_dp-vs-ppo", "rrhf_dp-vs-rrhf_ip2"):
        assert comparison in judged
    # Alpaca-sft inside the sweeps is the policy experiment=alpaca_sft trains: one train stage, one key.
    sft = json.loads(next((tmp_path / "results" / "alpaca_sft").rglob("metrics.json")).read_text())
    trained = json.loads((Path(sft["trained"]["artifact"]) / "inputs.json").read_text())["policy"]
    for metrics_file in (tmp_path / "results" / "table6").glob("*model=alpaca_sft*/metrics.json"):
        initial = json.loads(metrics_file.read_text())["initial"]["artifact"]
        assert json.loads((Path(initial) / "inputs.json").read_text())["policy"] == f"model:{trained}"
    assert set(_filled(tmp_path, 6, "Mean")) == {
        f"{model}-{s}" for model in ("llama", "alpaca", "alpaca_sft") for s in ("DP", "BP", "P")
    } | {"alpaca-D", "alpaca-IP-1", "alpaca-IP-2", "alpaca-IP-3", "alpaca-OP-32", "alpaca-OP-32+KL"}


def _stub_reply(body: dict) -> tuple[int, dict, dict]:
    """The ChatGPT and GPT-4 roles of experiment=wombat: a rating for the aspect grader (it varies with the rated
    answer), two scores for the pairwise judge, an answer to anything else (a prompt or a question)."""
    from fixtures.endpoint import completion

    system = body["messages"][0]["content"] if body["messages"][0]["role"] == "system" else ""
    last = body["messages"][-1]["content"]
    if system.startswith("You are a strict grader"):
        r = 1 + len(last) % 10
        return 200, {}, completion(f"relevance: {r}\ncorrectness: 7\ncoherence: 8\nsafety: 10")
    if "Assistant 1" in last:
        return 200, {}, completion(f"{1 + len(last) % 10} 7\nThe first answer is shorter.")
    return 200, {}, completion(f"A hosted model's answer ({len(last)} characters asked).")


@pytest.mark.rehearsal
def test_wombat_runs_against_the_stand_ins_and_a_stub_endpoint(stand_in_hub, stub, tmp_path: Path) -> None:
    """experiment=wombat: Alpaca on Alpaca's prompts (the stand-in tatsu-lab/alpaca), five candidates from four
    sources (the stub endpoint in ChatGPT's place, the data set's output, LLaMA and Alpaca sampled), the stub as
    the reward and the judge; on two ranks; the collated wombat table names every other system."""
    _, endpoint = stand_in_hub
    state, url = stub(_stub_reply)
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": f"Question {i}?"}) + "\n" for i in range(3)))
    hosted = f"{{name: chatgpt, base_url: '{url}', model: gpt-3.5-turbo, api_key_env: null}}"
    command = [
        "experiment=wombat",
        f"eval.pairwise.questions={questions}",
        f"sampling.sources.chatgpt.base_url={url}",
        "sampling.sources.chatgpt.api_key_env=null",
        f"reward.base_url={url}",
        "reward.api_key_env=null",
        f"eval.pairwise.judge.base_url={url}",
        "eval.pairwise.judge.api_key_env=null",
        f"eval.pairwise.versus=[initial,{hosted}]",
    ]
    fetched = fetch(tmp_path, endpoint, *command)
    lock = yaml.safe_load((tmp_path / "hub.lock.yaml").read_text())
    assert {"chavinlo/alpaca-native", "huggyllama/llama-7b"} <= set(lock["models"]), fetched.stdout
    assert "tatsu-lab/alpaca" in lock["datasets"]
    run(tmp_path, *command, *SCALE, *RANKS)
    (metrics_file,) = (tmp_path / "results").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    train = [json.loads(line) for line in Path(metrics["candidates"]).read_text().splitlines()]
    assert len(train) == 4 and all(r["sources"] == ["chatgpt", "chatgpt", "davinci", "llama", "alpaca"] for r in train)
    assert set(metrics["samples"]["sources"]) == {"chatgpt", "davinci", "llama", "alpaca"}
    assert set(metrics["pairwise"]) >= {"initial", "chatgpt"} and metrics["pairwise"]["initial"]["scored"] == 3
    table = (tmp_path / "tables" / "wombat.csv").read_text()
    assert "initial" in table and "chatgpt" in table and "Alpaca (ChatGPT)" not in table
    assert any(body["model"] == "gpt-4" for _, body in state.seen)
