"""rrhf.judging.scores: the Vicuna-style pair scores (two scores on the first line), both orders averaged,
unparsed and failed pairs counted apart and left out of the sums, never scored 0."""

import json

import httpx

from rrhf.judging.client import ChatClient, EndpointError
from rrhf.judging.scores import ScoredPair, parse_scores, score_pairs, scored_pair, summarise


def test_parse_scores() -> None:
    assert parse_scores("8 6\nAssistant 1 is better because...") == (8.0, 6.0)
    assert parse_scores("\n  **7.5, 9**  \nexplanation") == (7.5, 9.0)
    assert parse_scores("[10/1]") == (10.0, 1.0)
    for bad in ("", None, "8", "8 out of 10", "8 6 4", "0 5", "11 3", "Scores: 8 6", "I think 8 6"):
        assert parse_scores(bad) is None, bad


def _transport(answer, seen: list) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        user = json.loads(request.content)["messages"][1]["content"]
        first = user.split("[The Start of Assistant 1's Answer]\n")[1].split("\n[The End")[0]
        second = user.split("[The Start of Assistant 2's Answer]\n")[1].split("\n[The End")[0]
        seen.append((first, second))
        content = answer(first, second)
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": content}}]})

    return httpx.MockTransport(handler)


def test_both_orders_cancel_a_judge_that_favours_the_first_position() -> None:
    # Scores by quality, plus one point for whoever is shown first.
    quality = {"good": 8, "fine": 6}

    def biased(first: str, second: str) -> str:
        return f"{quality[first] + 1} {quality[second]}\nbecause"

    seen: list = []
    client = ChatClient("http://judge/v1", "m", api_key_env=None, transport=_transport(biased, seen))
    pairs = [("q1", "good", "fine"), ("q2", "fine", "good"), ("q3", "fine", "fine")]
    one = score_pairs(client, pairs, progress=False)
    assert [p.outcome for p in one] == ["win", "lose", "win"]  # the position bias decides q3
    assert seen == [("good", "fine"), ("fine", "good"), ("fine", "fine")]
    both = score_pairs(client, pairs, both_orders=True, progress=False)
    assert [(p.evaluated, p.versus) for p in both] == [(8.5, 6.5), (6.5, 8.5), (6.5, 6.5)]
    assert [p.outcome for p in both] == ["win", "lose", "tie"]
    summary = summarise(both)
    assert summary["evaluated_sum"] == 21.5 and summary["versus_sum"] == 21.5
    assert (summary["win"], summary["tie"], summary["lose"], summary["scored"]) == (1, 1, 1, 3)


def test_unparsed_and_failed_pairs_are_counted_not_scored() -> None:
    error = EndpointError("http://judge/v1", "m", 3, "HTTP 500", 500)
    unparsed = scored_pair(["I cannot decide", "7 7"])
    failed = scored_pair(["8 6", error])
    ok = scored_pair(["8 6"])
    assert unparsed.status == "unparsed" and unparsed.evaluated is None and unparsed.outcome is None
    assert unparsed.raw == ("I cannot decide", "7 7")
    assert failed.status == "error" and failed.outcome is None and "HTTP 500" in failed.error
    summary = summarise([unparsed, failed, ok])
    assert summary == {
        "pairs": 3,
        "scored": 1,
        "evaluated_sum": 8.0,
        "versus_sum": 6.0,
        "win": 1,
        "tie": 0,
        "lose": 0,
        "unparsed": 1,
        "error": 1,
    }
    assert ScoredPair(**{k: v for k, v in ok.to_dict().items() if k != "outcome"}) == ok
