"""eval=pairwise_judge (rrhf.judged_eval): the question set, how a policy is asked, answers from a file, and the
whole evaluation through run.py with the real local judge server on 127.0.0.1."""

import json
from pathlib import Path

import pytest
from fixtures.runs import run_py

from rrhf.assets import build_tiny_tokenizer, cache_root
from rrhf.data import read_jsonl
from rrhf.judged_eval import ALPACA_PROMPT, HH_PROMPT, load_questions, question_prompt

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_offline_question_set_loads() -> None:
    questions = load_questions(str(ROOT / "data" / "offline_questions" / "questions.jsonl"))
    assert len(questions) == 24 and [q["question_id"] for q in questions] == list(range(1, 25))
    assert all(q["question"].strip() for q in questions)


def test_bad_question_sets_are_refused_with_file_and_row(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"q\.jsonl: row 2 has no text in field 'question'"):
        load_questions(str(_write(tmp_path / "q.jsonl", [{"question": "a"}, {"prompt": "b"}])))
    with pytest.raises(ValueError, match="question_id repeats"):
        load_questions(str(_write(tmp_path / "r.jsonl", [{"question_id": 1, "question": "a"}] * 2)))
    ids = load_questions(str(_write(tmp_path / "s.jsonl", [{"text": "a"}, {"text": "b"}])), field="text")
    assert [q["question_id"] for q in ids] == [1, 2]


def test_how_a_policy_is_asked(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer(tmp_path)
    assert question_prompt(tokenizer, "Why?", "hh") == HH_PROMPT.format(question="Why?")
    assert question_prompt(tokenizer, "Why?", "alpaca").endswith("### Instruction:\nWhy?\n\n### Response:")
    assert ALPACA_PROMPT.startswith("Below is an instruction")
    # No chat template: auto falls back to HH's turns; with one, auto uses it.
    assert question_prompt(tokenizer, "Why?", "auto") == HH_PROMPT.format(question="Why?")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{{ '=' }}"
    assert question_prompt(tokenizer, "Why?", "auto") == "<Why?>="
    with pytest.raises(ValueError, match="prompt_format='vicuna'"):
        question_prompt(tokenizer, "Why?", "vicuna")


@pytest.mark.slow
def test_pairwise_judge_through_run_py_with_the_local_server(tmp_path: Path) -> None:
    questions = _write(tmp_path / "q.jsonl", [{"question": "Name a colour."}, {"question": "Say hello."}])
    answers = [{"question_id": 1, "answer": "Blue."}, {"question_id": 2, "answer": "Hi"}]
    theirs = _write(tmp_path / "theirs.jsonl", answers)
    overrides = [
        "experiment=smoke",
        "eval=pairwise_judge",
        f"eval.pairwise.questions={questions}",
        "eval.pairwise.max_new_tokens=8",
        "eval.pairwise.judge.max_tokens=8",
        f"eval.pairwise.versus=[initial,file:{theirs}]",
        f"eval.pairwise.judge.cache={tmp_path / 'judge_cache'}",
    ]
    first = run_py(tmp_path, *overrides, cache=cache_root())
    assert "starting a local judge server" in first.stdout + first.stderr
    metrics = json.loads(next((tmp_path / "results").rglob("metrics.json")).read_text())["pairwise"]
    for name in ("initial", "theirs"):
        summary = metrics[name]
        assert summary["pairs"] == 2 and summary["error"] == 0
        assert summary["scored"] + summary["unparsed"] == 2
        assert summary["win"] + summary["tie"] + summary["lose"] == summary["scored"]
        judged = read_jsonl(Path(summary["artifact"]) / "judgements.jsonl")
        # Both orders asked (the default), every answer kept as the judge wrote it.
        assert [j["question_id"] for j in judged] == [1, 2] and all(len(j["raw"]) == 2 for j in judged)
        assert all((j["outcome"] is None) == (j["status"] != "ok") for j in judged)
    answers = read_jsonl(Path(metrics["answers"]) / "answers.jsonl")
    assert [a["question"] for a in answers] == ["Name a colour.", "Say hello."]
    # The judge's answers are cached: with the judged stage gone, a rerun asks the server nothing and starts none.
    for summary in (metrics["initial"], metrics["theirs"]):
        for path in sorted(Path(summary["artifact"]).iterdir()):
            path.unlink()
        Path(summary["artifact"]).rmdir()
        Path(f"{summary['artifact']}.lock").unlink(missing_ok=True)
    rerun = run_py(tmp_path, *overrides, cache=cache_root())
    assert "starting a local judge server" not in rerun.stdout + rerun.stderr
    again = json.loads(next((tmp_path / "results").rglob("metrics.json")).read_text())["pairwise"]
    assert {k: v for k, v in again["initial"].items() if k != "artifact"} == {
        k: v for k, v in metrics["initial"].items() if k != "artifact"
    }
