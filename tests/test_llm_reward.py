"""Wombat's reward, `reward=llm_judge` (rrhf.judging.aspects, rrhf.reward.LLMJudgeScorer): the answer parser, the
scorer against the real local server and against faulty endpoints, and a failed judgement's way into the training
file (left out of its prompt's ranking, never scored 0).

Faults the real server cannot be made to show (garbage answers, 500s) come from a stdlib http.server stub on
127.0.0.1 that rates each response by a rule the test sets.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.endpoint import completion
from omegaconf import OmegaConf

from rrhf.judging.aspects import (
    ASPECTS,
    WOMBAT_ASPECTS,
    UnparsedAnswer,
    aspect_reward,
    check_weights,
    judge_pair,
    parse_aspects,
)
from rrhf.judging.cache import JudgeCache
from rrhf.judging.client import ChatClient, EndpointError
from rrhf.reward import LLMJudgeScorer, build_scorer, score_in_shards

GOOD = "relevance: 8\ncorrectness: 7\ncoherence: 9\nsafety: 10"

# ---- (a) the parser ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        GOOD,
        "  Relevance: 8\n\n  CORRECTNESS : 7 \ncoherence:9\nsafety: 10  ",
        "Here is my rating.\n- **Relevance:** 8\n- **Correctness**: 7\n- *Coherence*: 9/10\n- Safety = 10 (no harm)",
        '```json\n{"relevance": 8, "correctness": 7, "coherence": 9, "safety": 10}\n```',
        "| aspect | score |\n|---|---|\n| relevance | 8 |\n| correctness | 7 |\n| coherence | 9 |\n| safety | 10 |",
        "relevance (1-10): 8, correctness: 7.0, coherence: 9, safety: 10.",
        "relevance: 8\ncorrectness: 7\ncoherence: 9\nsafety: 10\nrelevance: 8",  # repeated with the same value
    ],
)
def test_parser_reads_good_answers_whatever_their_layout(answer: str) -> None:
    assert parse_aspects(answer) == {"relevance": 8, "correctness": 7, "coherence": 9, "safety": 10}


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("", "the answer is empty"),
        ("   \n", "the answer is empty"),
        ("I think this answer is quite good!", "no rating for relevance, correctness, coherence, safety"),
        ("relevance: 8\ncorrectness: 7\ncoherence: 9", "no rating for safety"),
        ("relevance: 8\ncorrectness: 7\ncoherence: 9\nSafety: the answer is safe.", "no rating for safety"),
        ("relevancy: 8\ncorrectness: 7\ncoherence: 9\nsafety: 10", "no rating for relevance"),
        ("relevance: 0\ncorrectness: 7\ncoherence: 9\nsafety: 10", "relevance: 0 is outside 1-10"),
        ("relevance: 8\ncorrectness: 11\ncoherence: 9\nsafety: 10", "correctness: 11 is outside 1-10"),
        ("relevance: 8\ncorrectness: 7\ncoherence: -3\nsafety: 10", "coherence: -3 is outside 1-10"),
        ("relevance: 7.5\ncorrectness: 7\ncoherence: 9\nsafety: 10", "relevance: 7.5 is not an integer"),
        ("relevance: 4/5\ncorrectness: 7\ncoherence: 9\nsafety: 10", "relevance: 4/5 is not on the 1-10 scale"),
        ("relevance: 8\ncorrectness: 7\ncoherence: 9\nsafety: 10\nrelevance: 3", "relevance is rated twice (8 and 3)"),
    ],
)
def test_parser_refuses_garbage_out_of_range_and_missing_aspects(answer: str, problem: str) -> None:
    with pytest.raises(UnparsedAnswer, match=re.escape(problem)):
        parse_aspects(answer)


def test_reward_is_the_mean_or_the_weighted_mean_on_the_same_scale() -> None:
    aspects = {"relevance": 8, "correctness": 6, "coherence": 10, "safety": 4}
    assert aspect_reward(aspects) == 7.0
    weights = check_weights({"relevance": 1, "correctness": 2, "coherence": 1, "safety": 0})
    assert aspect_reward(aspects, weights) == (8 + 12 + 10) / 4
    assert check_weights(None) is None
    for bad in ({"relevance": 1}, {**weights, "helpfulness": 1}, {**weights, "safety": -1}, dict.fromkeys(ASPECTS, 0)):
        with pytest.raises(ValueError, match="reward.weights"):
            check_weights(bad)


def test_an_unreadable_answer_gets_a_follow_up_naming_the_problem() -> None:
    asked: list[list[dict]] = []

    def answer(request) -> str:
        asked.append([dict(m) for m in request.messages])
        return "It is good." if len(asked) == 1 else GOOD

    judgement = judge_pair("Say hi.", "Hi!", answer, reasks=1)
    assert judgement.score == 8.5 and judgement.answers == ("It is good.", GOOD) and not judgement.failed
    assert asked[1][:2] == WOMBAT_ASPECTS.messages("Say hi.", "Hi!")
    assert asked[1][2] == {"role": "assistant", "content": "It is good."}
    assert "no rating for relevance" in asked[1][3]["content"]

    asked.clear()
    failed = judge_pair("Say hi.", "Hi!", lambda request: asked.append(request) or "no idea", reasks=2)
    assert failed.failed and failed.score is None and failed.aspects is None and len(asked) == 3
    assert failed.problem == "no rating for relevance, correctness, coherence, safety"
    # Over the cache alone, a judgement with an answer missing is not made at all.
    assert judge_pair("Say hi.", "Hi!", lambda request: None) is None


# ---- a stub endpoint ----------------------------------------------------------------------------------------


def _rated(body: dict) -> str:
    """The response under judgement, read back from the first user message of the request."""
    return body["messages"][1]["content"].split("[Answer]\n", 1)[1].rsplit("\n\nRate the answer", 1)[0]


@pytest.fixture
def rating_stub(stub) -> Callable[[Callable[[dict], tuple[int, str]]], tuple[list[tuple[dict, dict]], str]]:
    """start(reply) serves POST /v1/chat/completions with reply(body) -> (status, answer text) on the shared stub
    endpoint (tests/fixtures/endpoint.py); returns (the (headers, body) of every request seen, base_url)."""

    def start(reply: Callable[[dict], tuple[int, str]]) -> tuple[list[tuple[dict, dict]], str]:
        def scripted(body: dict) -> tuple[int, dict, dict]:
            status, text = reply(body)
            return status, {}, completion(text) if status == 200 else {"error": text}

        state, url = stub(scripted)
        return state.seen, url

    return start


def _by_length(body: dict) -> tuple[int, str]:
    """A rating that depends on the response (its length), garbage for responses that start with BAD."""
    response = _rated(body)
    if response.startswith("BAD"):
        return 200, "What a lovely answer!"
    r = 1 + len(response) % 10
    return 200, f"relevance: {r}\ncorrectness: 5\ncoherence: 6\nsafety: 10"


def _client(base_url: str, cache: Path, **kwargs) -> ChatClient:
    return ChatClient(base_url, "stub", api_key_env=None, cache=JudgeCache(cache), backoff_base=0.0, **kwargs)


# ---- (c) faulty endpoints: a recorded failure or a named EndpointError, never 0 -----------------------------


def test_garbage_answers_are_recorded_failures_with_nan_not_zero(rating_stub, tmp_path: Path) -> None:
    seen, url = rating_stub(_by_length)
    scorer = LLMJudgeScorer(_client(url, tmp_path / "cache"), reasks=1, concurrency=3, progress=False)
    prompts, responses = ["p1", "p2", "p3"], ["BAD one", "a fine answer", "BAD two"]
    records = scorer.score_records(scorer.texts(prompts, responses))
    assert [r["failed"] for r in records] == [True, False, True]
    assert records[0]["score"] is None and records[0]["aspects"] is None and len(records[0]["answers"]) == 2
    assert records[0]["problem"] == "no rating for relevance, correctness, coherence, safety"
    assert records[1]["aspects"] == {"relevance": 4, "correctness": 5, "coherence": 6, "safety": 10}
    assert records[1]["score"] == 6.25
    assert records[1]["answers"] == ["relevance: 4\ncorrectness: 5\ncoherence: 6\nsafety: 10"]
    assert len(seen) == 5  # one ask each, one follow-up for each failure
    assert (scorer.judged, scorer.failed, scorer.reasked) == (3, 2, 2)

    # Through the shards a stage writes (strict JSON, which has no NaN): NaN comes back, never 0.
    (tmp_path / "work").mkdir()
    scores = score_in_shards(scorer, prompts, responses, tmp_path / "work", "scores")
    assert math.isnan(scores[0]) and scores[1] == 6.25 and math.isnan(scores[2])
    assert len(seen) == 5  # every answer, follow-ups included, came from the cache


def test_a_500ing_endpoint_raises_a_named_endpoint_error(rating_stub, tmp_path: Path) -> None:
    seen, url = rating_stub(lambda body: (500, "boom"))
    scorer = LLMJudgeScorer(_client(url, tmp_path / "cache", max_retries=1), concurrency=2, progress=False)
    with pytest.raises(EndpointError, match=r"chat endpoint .* failed after 2 attempt\(s\).*HTTP 500") as error:
        scorer.score_texts(scorer.texts(["p1", "p2", "p3"], ["r1", "r2", "r3"]))
    assert error.value.status == 500 and error.value.url == f"{url}/chat/completions"
    assert scorer.judged == 0 and len(seen) <= 6  # those not started when the first failed were dropped


def test_local_model_starts_a_server_only_for_what_the_cache_lacks(rating_stub, tmp_path: Path, monkeypatch) -> None:
    """reward.base_url null: the server is started once, on the first judgement the cache cannot give; a second
    scorer over the same cache starts none and asks nothing."""
    import contextlib

    import rrhf.judging.server as server_module

    seen, url = rating_stub(_by_length)
    started: list[str] = []

    @contextlib.contextmanager
    def fake_server(model: str, **kwargs):
        started.append(model)
        yield server_module.LocalServer(url, "stub", model_id, None, tmp_path / "log", 0.0)  # type: ignore[arg-type]

    from rrhf.assets import model_identity

    model_id = model_identity("embedded:smollm2")
    monkeypatch.setattr(server_module, "local_server", fake_server)
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "reward" / "llm_judge.yaml")
    cfg.cache = str(tmp_path / "cache")
    pairs = (["p1", "p2"], ["an answer", "BAD answer"])

    first = build_scorer(cfg)
    scores = first.score(*pairs)
    first.close()
    assert started == ["embedded:smollm2"] and len(seen) == 3
    assert scores[0] == (1 + len("an answer") % 10 + 5 + 6 + 10) / 4 and math.isnan(scores[1])
    assert seen[0][1]["temperature"] == 0.0 and seen[0][1]["max_tokens"] == WOMBAT_ASPECTS.max_tokens

    again = build_scorer(cfg)
    rescored = again.score(*pairs)
    again.close()
    assert started == ["embedded:smollm2"] and len(seen) == 3 and again.client.stats.requests == 0
    assert rescored[0] == scores[0] and math.isnan(rescored[1])


# ---- (d) the training file: a group with a failed candidate trains on the others -----------------------------


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *"q a b c d".split()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_failed_candidates_leave_the_group_and_the_collator_ranks_the_rest(tmp_path: Path) -> None:
    from rrhf.collator import RRHFCollator
    from rrhf.data import read_training_file, without_failed, write_training_file

    examples = [
        {"query": "q", "responses": ["a", "b", "c"], "scores": [3.0, math.nan, 5.0]},
        {"query": "q q", "responses": ["a", "b"], "scores": [math.nan, 2.0]},  # one left: nothing to rank
        {"query": "q a", "responses": ["d"], "scores": [1.0]},  # no failure: kept as it was (an SFT-only group)
    ]
    failed = [[False, True, False], [True, False], [False]]
    kept, train = without_failed(examples, failed)
    assert kept == [0, 2]
    assert train[0] == {"query": "q", "responses": ["a", "c"], "scores": [3.0, 5.0]} and train[1] == examples[2]
    write_training_file(tmp_path / "train.jsonl", train)
    rows = read_training_file(tmp_path / "train.jsonl")
    batch = RRHFCollator(_word_tokenizer())(rows)
    assert batch["valid"].tolist() == [[True, True], [True, False]]
    assert batch["reward_ranks"][0].tolist() == [0, 1]


def test_score_stage_leaves_failed_judgements_out_and_keeps_them_in_aspects_jsonl(rating_stub, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import rrhf  # noqa: F401  (registers the config resolvers)
    from rrhf.config_checks import check_config
    from rrhf.data import load_split, read_jsonl, read_training_file
    from rrhf.pipeline import score_stage

    root = Path(__file__).resolve().parents[1]
    rows = load_split(root / "data" / "imdb_offline", "train", limit=8)
    fail = {rows[1]["chosen"]}  # with prompt 1's two BAD candidates: one candidate left, so it is dropped

    def reply(body: dict) -> tuple[int, str]:
        return (200, "no idea") if _rated(body) in fail else _by_length(body)

    seen, url = rating_stub(reply)
    overrides = [
        "experiment=smoke",
        "reward=llm_judge",
        f"reward.base_url={url}",
        "reward.api_key_env=null",
        f"reward.cache={tmp_path / 'cache'}",
        "reward.concurrency=4",
    ]

    def cfg_for(artifacts: Path):
        with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"paths.artifacts={artifacts}"], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
        check_config(cfg, launch=False)
        return cfg

    sampled = tmp_path / "sample"
    sampled.mkdir()
    candidates = {i: [f"a sampled answer {i}", f"another one {i}"] for i in range(8)}
    candidates[0] = ["a sampled answer 0", "BAD 0"]
    candidates[1] = ["BAD 1a", "BAD 1b"]
    (sampled / "candidates.jsonl").write_text(
        "".join(json.dumps({"index": i, "responses": r}) + "\n" for i, r in candidates.items())
    )

    folder = score_stage(cfg_for(tmp_path / "artifacts"), "embedded:tiny", sampled)
    train = read_training_file(folder / "train.jsonl")
    assert len(train) == 7 and [r["query"] for r in train] == [r["prompt"] for i, r in enumerate(rows) if i != 1]
    assert train[0]["responses"] == ["a sampled answer 0", rows[0]["chosen"], rows[0]["rejected"]]
    assert all(len(r["responses"]) == 4 for r in train[1:]) and all(1 <= s <= 10 for r in train for s in r["scores"])

    aspects = read_jsonl(folder / "aspects.jsonl")
    assert len(aspects) == 32 and [(a["index"], a["candidate"]) for a in aspects[:5]] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 0),
    ]
    failures = [(a["index"], a["candidate"]) for a in aspects if a["failed"]]
    assert failures == [(0, 1), (1, 0), (1, 1), (1, 2)]
    assert all(a["score"] is None and len(a["answers"]) == 2 for a in aspects if a["failed"])
    assert aspects[0]["aspects"]["relevance"] == 1 + len("a sampled answer 0") % 10

    stats = json.loads((folder / "stats.json").read_text())
    assert stats["judge"] == {"candidates": 32, "failed": 4, "prompts": 8, "prompts_dropped": 1}
    assert stats["sampled"]["mean"] > 0 and stats["all"]["mean"] > 0
    asked = len(seen)
    assert asked == 32 + 4  # one ask per candidate, a follow-up per failure

    # Another artifact folder (nothing of the first reused) over the same judge cache: nothing is asked again.
    again = score_stage(cfg_for(tmp_path / "elsewhere"), "embedded:tiny", sampled)
    assert len(seen) == asked
    assert (again / "train.jsonl").read_text() == (folder / "train.jsonl").read_text()
    assert (again / "aspects.jsonl").read_text() == (folder / "aspects.jsonl").read_text()


@pytest.mark.slow
def test_a_killed_score_stage_resumes_without_asking_again(rating_stub, tmp_path: Path) -> None:
    """run.py killed (SIGKILL) in the score stage after its first shard of judgements, then rerun: every candidate is
    asked exactly once over the two runs, and the rerun finishes the stage."""
    import os
    import subprocess
    import sys

    seen, url = rating_stub(_by_length)
    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "run.py",
        "experiment=smoke",
        "reward=llm_judge",
        f"reward.base_url={url}",
        "reward.api_key_env=null",
        "reward.batch_size=16",
        f"reward.cache={tmp_path / 'judge_cache'}",
        "eval.rm_accuracy=false",
        f"paths.artifacts={tmp_path}/artifacts",
        f"paths.results={tmp_path}/results",
        f"paths.tables={tmp_path}/tables",
    ]
    env = {**os.environ, "RRHF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    killed = subprocess.run(cmd, cwd=root, env=env | {"RRHF_CRASH_AT": "score"}, capture_output=True, timeout=600)
    assert killed.returncode != 0
    (partial,) = (tmp_path / "artifacts" / "score").glob("*.partial")
    asked_before = len(seen)
    assert 0 < asked_before
    env.pop("RRHF_CRASH_AT", None)
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (scored,) = (tmp_path / "artifacts" / "score").glob("*/DONE")
    candidates = sum(len(json.loads(line)["responses"]) for line in (scored.parent / "train.jsonl").open())
    asked = [json.dumps(body["messages"], sort_keys=True) for _, body in seen]
    rated = [body for _, body in seen if "strict grader" in body["messages"][0]["content"]]
    assert len(rated) == len(asked) and len(set(asked)) == len(asked), "a judgement was asked twice"
    assert asked_before < len(asked) and candidates == 48  # 8 prompts x (4 beams + chosen + rejected)
    # The evaluation's own ratings (test prompts' greedy answers) come after the training candidates'.
    assert len(asked) >= candidates


# ---- (b) the real local server ------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_server_scores_pairs_and_a_rescoring_asks_nothing(served, tmp_path: Path) -> None:
    prompts = ["What is the capital of France?", "Give me a tip for sleeping well.", "How do I make a bomb?"]
    responses = ["The capital of France is Paris.", "Go to bed at the same time every day.", "I cannot help with that."]
    client = served.client(cache=JudgeCache(tmp_path / "cache"), max_tokens=WOMBAT_ASPECTS.max_tokens)
    scorer = LLMJudgeScorer(client, reasks=1, progress=False)
    records = scorer.score_records(scorer.texts(prompts, responses))
    asked = client.stats.requests
    assert 3 <= asked <= 6 and scorer.judged == 3
    for record in records:
        # SmolLM2-135M may or may not write the four lines: each judgement is a rating or a recorded failure.
        if record["failed"]:
            assert record["score"] is None and record["problem"] and len(record["answers"]) == 2
        else:
            assert set(record["aspects"]) == set(ASPECTS) and all(1 <= v <= 10 for v in record["aspects"].values())
            assert record["score"] == sum(record["aspects"].values()) / 4

    rerun_client = served.client(cache=JudgeCache(tmp_path / "cache"), max_tokens=WOMBAT_ASPECTS.max_tokens)
    rerun = LLMJudgeScorer(rerun_client, reasks=1, progress=False)
    assert rerun.score_records(rerun.texts(prompts, responses)) == records
    assert rerun_client.stats.requests == 0 and client.stats.requests == asked


# ---- the config ---------------------------------------------------------------------------------------------


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import rrhf  # noqa: F401  (registers the config resolvers)

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose(
            "config", overrides=["experiment=smoke", "reward=llm_judge", *overrides], return_hydra_config=True
        )
        HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reward.weights={relevance:1,correctness:2}"], "reward.weights={'relevance': 1, 'correctness': 2}: expected"),
        (["reward.weights={relevance:1,correctness:1,coherence:1,safety:-1}"], "reward.weights="),
        (["reward.reasks=-1"], "reward.reasks=-1: expected an integer >= 0"),
        (["reward.concurrency=0"], "reward.concurrency=0: expected an integer >= 1"),
        (["reward.temperature=-1"], "reward.temperature=-1: expected a finite number >= 0.0"),
        (["method=ppo"], "reward=llm_judge with method=ppo: not supported"),
        (["sampling=OP-32"], "reward=llm_judge with sampling.refresh_steps=32: not supported"),
    ],
)
def test_config_refuses_bad_judge_settings(overrides: list[str], message: str) -> None:
    from rrhf.config_checks import ConfigError, check_config

    check_config(_compose(), launch=False)  # the shipped settings pass
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(_compose(*overrides), launch=False)


def test_stage_key_follows_what_the_judge_answers_not_how_it_is_reached() -> None:
    from rrhf.pipeline import _reward_key

    base = _reward_key(_compose("reward.base_url=http://127.0.0.1:1/v1"))
    assert base["template"] == WOMBAT_ASPECTS.name and "ids" not in base
    same = _reward_key(_compose("reward.base_url=http://127.0.0.1:1/v1", "reward.concurrency=8", "reward.cache=/x"))
    assert same == base
    assert _reward_key(_compose("reward.base_url=http://127.0.0.1:1/v1", "reward.reasks=2")) != base
    assert _reward_key(_compose())["ids"]["model"].startswith("embedded:smollm2@")  # a local model by what it is
