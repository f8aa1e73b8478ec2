"""The LLM judge (rrhf.judging): the client against a real local OpenAI-compatible server, the cache, retries and
their errors, and the two-order pairwise protocol.

Faults a real server cannot be made to show (429, 5xx, Retry-After) come from a stdlib http.server stub on
127.0.0.1; the judge's combination rules are checked with canned answers through httpx.MockTransport.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fixtures.endpoint import completion

from rrhf.judging import (
    MT_BENCH_PAIR,
    SINGLE_LETTER,
    ChatClient,
    ChatRequest,
    EndpointError,
    JudgeCache,
    combine,
    free_port,
    judgement_from_answers,
    pairwise_judgements,
    parse_letter,
    parse_verdict,
    request_key,
    summarise,
    template_by_id,
)


class Sleeps(list):
    """Records the back-off delays instead of sleeping them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


HELLO = [{"role": "user", "content": "hello"}]


def test_429_then_200_honours_retry_after(stub) -> None:
    state, url = stub([(429, {"Retry-After": "2"}, {"error": "slow down"}), (200, {}, completion("hi"))])
    sleeps = Sleeps()
    client = ChatClient(url, "m", api_key_env=None, sleep=sleeps)
    answer = client.complete(HELLO)
    assert answer.content == "hi" and not answer.cached
    assert sleeps == [2.0] and client.stats.requests == 2 and client.stats.retries == 1
    body = state.seen[-1][1]
    assert body["model"] == "m" and body["messages"] == HELLO and body["temperature"] == 0.0


def test_5xx_backs_off_exponentially_then_names_endpoint_and_status(stub) -> None:
    state, url = stub([(503, {}, {"error": "overloaded"})])
    sleeps = Sleeps()
    client = ChatClient(url, "m", api_key_env=None, max_retries=3, backoff_base=1.0, backoff_max=3.0, sleep=sleeps)
    with pytest.raises(EndpointError) as caught:
        client.complete(HELLO)
    error = caught.value
    assert len(state.seen) == 4 and error.attempts == 4 and error.status == 503
    assert url in str(error) and "HTTP 503" in str(error) and "overloaded" in str(error)
    # base * 2**n with jitter in [0.5, 1], capped at backoff_max.
    for n, delay in enumerate(sleeps):
        assert 0.5 * min(3.0, 2**n) <= delay <= min(3.0, 2**n)
    assert len(sleeps) == 3 and client.stats.failures == 1


def test_client_error_is_not_retried_and_401_names_the_key_variable(stub, monkeypatch) -> None:
    state, url = stub([(400, {}, {"error": "bad request"})])
    client = ChatClient(url, "m", api_key_env=None, sleep=Sleeps())
    with pytest.raises(EndpointError, match="HTTP 400") as caught:
        client.complete(HELLO)
    assert caught.value.attempts == 1 and len(state.seen) == 1

    monkeypatch.setenv("RRHF_TEST_JUDGE_KEY", "sk-test")
    state, url = stub([(401, {}, {"error": "invalid key"})])
    client = ChatClient(url, "m", api_key_env="RRHF_TEST_JUDGE_KEY", sleep=Sleeps())
    with pytest.raises(EndpointError, match=r"\$RRHF_TEST_JUDGE_KEY"):
        client.complete(HELLO)
    assert state.seen[0][0]["Authorization"] == "Bearer sk-test"


def test_no_key_sent_without_one(stub, monkeypatch) -> None:
    monkeypatch.delenv("RRHF_TEST_JUDGE_KEY", raising=False)
    state, url = stub([(200, {}, completion("ok"))])
    ChatClient(url, "m", api_key_env="RRHF_TEST_JUDGE_KEY").complete(HELLO)
    assert "Authorization" not in state.seen[0][0]


def test_endpoint_down_fails_with_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    sleeps = Sleeps()
    client = ChatClient(url, "m", api_key_env=None, max_retries=2, backoff_base=0.5, sleep=sleeps)
    started = time.monotonic()
    with pytest.raises(EndpointError) as caught:
        client.complete(HELLO)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"{url}/chat/completions" in message and "ConnectError" in message and "3 attempt(s)" in message
    assert len(sleeps) == 2 and caught.value.status is None


def test_retry_after_forms() -> None:
    from email.utils import formatdate

    from rrhf.judging.client import _retry_after

    assert _retry_after(httpx.Headers({"retry-after-ms": "1500"})) == 1.5
    assert _retry_after(httpx.Headers({"Retry-After": "7"})) == 7.0
    assert 25 <= _retry_after(httpx.Headers({"Retry-After": formatdate(time.time() + 30, usegmt=True)})) <= 30
    assert _retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert _retry_after(httpx.Headers({})) is None


def test_many_requests_count_failures_keep_order_and_stop_past_max_failures(stub) -> None:
    def reply(body: dict) -> tuple[int, dict, dict]:
        text = body["messages"][0]["content"]
        return (500, {}, {"error": "boom"}) if text.startswith("bad") else (200, {}, completion(f"re: {text}"))

    state, url = stub(reply)
    client = ChatClient(url, "m", api_key_env=None, max_retries=1, backoff_base=0.0, sleep=Sleeps())
    texts = ["a", "bad 1", "b", "a", "c", "bad 2"]
    requests = [ChatRequest([{"role": "user", "content": t}]) for t in texts]
    results = client.complete_many(requests, concurrency=3, progress=False)
    assert [getattr(r, "content", None) for r in results] == ["re: a", None, "re: b", "re: a", "re: c", None]
    assert isinstance(results[1], EndpointError) and "HTTP 500" in str(results[1])
    assert len(state.seen) == 3 + 2 * 2  # "a" sent once; each "bad" tried twice
    with pytest.raises(EndpointError, match="max_failures=0"):
        client.complete_many(requests, concurrency=1, progress=False, max_failures=0)


# ---------------------------------------------------------------------------------------------------------------
# The cache.


def test_cache_key_covers_model_template_messages_and_params() -> None:
    base = request_key("m", "t@v1", HELLO, {"temperature": 0.0})
    assert base == request_key("m", "t@v1", [dict(HELLO[0])], {"temperature": 0.0})
    assert (
        len(
            {
                base,
                request_key("m2", "t@v1", HELLO, {"temperature": 0.0}),
                request_key("m", "t@v2", HELLO, {"temperature": 0.0}),
                request_key("m", "t@v1", [{"role": "user", "content": "hello!"}], {"temperature": 0.0}),
                request_key("m", "t@v1", HELLO, {"temperature": 0.0, "max_tokens": 8}),
            }
        )
        == 5
    )


def test_cache_answers_a_rerun_without_requests(stub, tmp_path: Path) -> None:
    state, url = stub([(200, {}, completion("cached text"))])
    cache = JudgeCache(tmp_path / "cache")
    ChatClient(url, "m", api_key_env=None, cache=cache).complete(HELLO, template="t@v1")
    again = ChatClient(url, "m", api_key_env=None, cache=JudgeCache(tmp_path / "cache"))
    answer = again.complete(HELLO, template="t@v1")
    assert answer.cached and answer.content == "cached text" and again.stats.requests == 0 and len(state.seen) == 1
    # Another parameter is another request.
    again.complete(HELLO, template="t@v1", params={"max_tokens": 3})
    assert len(state.seen) == 2 and len(cache) == 2
    entry = json.loads(cache.path(answer.key).read_text())
    assert entry["request"]["template"] == "t@v1" and entry["answer"]["content"] == "cached text"


def test_cache_survives_concurrent_writers_and_ignores_a_damaged_entry(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path)
    key = request_key("m", "", HELLO, {})

    def write(i: int) -> None:
        for _ in range(20):
            cache.put(key, {"i": i}, {"content": "same answer"})
            assert cache.get(key)["content"] == "same answer"

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in cache.path(key).parent.iterdir()] == [f"{key}.json"]  # no temporary file left
    cache.path(key).write_text('{"answer": ')  # e.g. edited by hand
    assert cache.get(key) is None


# ---------------------------------------------------------------------------------------------------------------
# The pairwise judge, with canned answers.


def test_parse_verdict() -> None:
    assert parse_verdict("A is clearly better.\n[[A]]") == "A"
    assert parse_verdict("[[ B ]]") == "B"
    assert parse_verdict("Equally good. [[C]]") == "tie"
    assert parse_verdict("[[A]] ... so my final verdict: [[A]]") == "A"
    assert parse_verdict('"[[A]]" if A is better, "[[B]]" if B is better') is None  # echoed instructions
    assert parse_verdict("Assistant A is better.") is None
    assert parse_verdict("") is None


def test_parse_letter() -> None:
    assert parse_letter("A") == "A" and parse_letter("B") == "B" and parse_letter("C") == "tie"
    assert parse_letter(" B.") == "B" and parse_letter("**A**") == "A" and parse_letter('"C"') == "tie"
    assert parse_letter("[[A") == "A" and parse_letter("\nA,") == "A"  # two tokens cut a longer answer short
    # Only a letter standing alone, first: a word that starts with A or B is no verdict, nor lower case.
    for text in ("Answer A", "Both", "Better: A", "AB", "a", "D", "", "The answer is A"):
        assert parse_letter(text) is None, text


def test_templates_by_id() -> None:
    assert template_by_id("mt_bench_pair") is MT_BENCH_PAIR and template_by_id("single_letter") is SINGLE_LETTER
    assert SINGLE_LETTER.max_tokens == 2 and SINGLE_LETTER.parser is parse_letter
    assert MT_BENCH_PAIR.parser is parse_verdict
    with pytest.raises(KeyError, match="known: mt_bench_pair, single_letter"):
        template_by_id("nope")
    text = SINGLE_LETTER.messages("q", "x", "y")[1]["content"]
    assert text.endswith("Reply with one letter only: A, B, or C if they are equally good.")
    # Read with the template's own parser: a letter is no MT-Bench verdict; a sentence is no single letter.
    judged = judgement_from_answers("B", "A", SINGLE_LETTER.name, SINGLE_LETTER.parser)
    assert judged.label == "B" and judged.consistent and judged.template == "single_letter@v1"
    assert judgement_from_answers("Answer A", "B", "", parse_letter).status == "unparsed"
    assert judgement_from_answers("A", "B").status == "unparsed"


def test_combine_order_flip_is_a_tie() -> None:
    assert combine("A", "A") == "A" and combine("B", "B") == "B" and combine("tie", "tie") == "tie"
    assert combine("A", "B") == "tie" and combine("A", "tie") == "tie"
    assert combine("A", None) is None and combine(None, None) is None


def _judge_transport(answer: Callable[[str, str], str], seen: list | None = None) -> httpx.MockTransport:
    """A judge that sees which response the prompt shows first and second; `answer(first, second)` is its reply."""

    def handler(request: httpx.Request) -> httpx.Response:
        user = json.loads(request.content)["messages"][1]["content"]
        first = user.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
        second = user.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End")[0]
        if seen is not None:
            seen.append((first, second))
        return httpx.Response(200, json=completion(answer(first, second)))

    return httpx.MockTransport(handler)


PAIRS = [("p1", "good", "bad"), ("p2", "bad", "good"), ("p3", "good", "good")]


def test_pairwise_judgements_both_orders(tmp_path: Path) -> None:
    def fair(first: str, second: str) -> str:
        return "[[C]]" if first == second else ("[[A]]" if first == "good" else "[[B]]")

    seen: list = []
    client = ChatClient("http://judge/v1", "m", api_key_env=None, transport=_judge_transport(fair, seen))
    out = pairwise_judgements(client, PAIRS, progress=False)
    assert [j.label for j in out] == ["A", "B", "tie"] and all(j.consistent for j in out)
    assert seen[:2] == [("good", "bad"), ("bad", "good")]  # the same pair, swapped
    assert out[0].raw_ab == "[[A]]" and out[0].raw_ba == "[[B]]" and out[0].template == MT_BENCH_PAIR.name

    # A judge that always picks the first answer shown flips with the order: every pair is a tie.
    client = ChatClient("http://judge/v1", "m", api_key_env=None, transport=_judge_transport(lambda a, b: "[[A]]"))
    out = pairwise_judgements(client, PAIRS, progress=False)
    assert [j.label for j in out] == ["tie"] * 3 and not any(j.consistent for j in out)
    assert summarise(out)["tie"] == 1.0


def test_unparsed_answers_stay_raw_and_cached(tmp_path: Path) -> None:
    def rambling(first: str, second: str) -> str:
        return "Both reviews talk about the film." if first == "bad" else "[[A]]"

    cache = JudgeCache(tmp_path / "cache")
    client = ChatClient("http://judge/v1", "m", api_key_env=None, cache=cache, transport=_judge_transport(rambling))
    first = pairwise_judgements(client, PAIRS[:1], progress=False)[0]
    assert first.label is None and first.status == "unparsed"
    assert first.verdict_ab == "A" and first.verdict_ba is None
    assert first.raw_ba == "Both reviews talk about the film."
    assert summarise([first])["unparsed"] == 1.0

    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError("a cached pair must not be asked again")

    rerun = ChatClient(
        "http://judge/v1",
        "m",
        api_key_env=None,
        cache=JudgeCache(tmp_path / "cache"),
        transport=httpx.MockTransport(refuse),
    )
    assert pairwise_judgements(rerun, PAIRS[:1], progress=False)[0] == first
    assert rerun.uncached([ChatRequest(HELLO)]) == [0]


def test_failed_request_is_an_error_not_a_label() -> None:
    error = EndpointError("http://x/v1/chat/completions", "m", 3, "last error HTTP 503: down", 503)
    judgement = judgement_from_answers("[[A]]", error)
    assert judgement.label is None and judgement.status == "error" and "HTTP 503" in judgement.error
    assert judgement.raw_ab == "[[A]]" and judgement.raw_ba is None
    assert summarise([judgement])["error"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# The real local server (transformers serve with the embedded SmolLM2 folder) over HTTP on 127.0.0.1.


def _posts_seen(server) -> int:
    # uvicorn's access log: one line per request the server answered.
    return server.log_path.read_text(errors="replace").count('"POST /v1/chat/completions')


@pytest.mark.slow
def test_local_server_answers_and_cache_spares_a_second_run(served, tmp_path: Path) -> None:
    assert served.base_url.startswith("http://127.0.0.1:") and served.model_id.startswith("embedded:smollm2@")
    before = _posts_seen(served)
    client = served.client(cache=JudgeCache(tmp_path / "cache"), max_tokens=4)
    requests = [ChatRequest([{"role": "user", "content": f"Name a colour. ({i})"}]) for i in range(3)]
    answers = client.complete_many(requests, concurrency=2, progress=False)
    assert all(not isinstance(a, EndpointError) and a.content and not a.cached for a in answers)
    assert answers[0].finish_reason == "length"
    assert _posts_seen(served) - before == 3

    # Greedy (temperature 0): the same request gets the same text; a rerun is answered by the cache alone.
    rerun = served.client(cache=JudgeCache(tmp_path / "cache"), max_tokens=4)
    again = rerun.complete_many(requests, concurrency=2, progress=False)
    assert [a.content for a in again] == [a.content for a in answers] and all(a.cached for a in again)
    assert rerun.stats.requests == 0 and _posts_seen(served) - before == 3


@pytest.mark.slow
def test_local_server_pairwise_judgement(served, tmp_path: Path) -> None:
    client = served.client(cache=JudgeCache(tmp_path / "cache"), max_tokens=6)
    (judgement,) = pairwise_judgements(client, [("Say something kind.", "You are great.", "Go away.")], progress=False)
    # SmolLM2-135M rarely writes a verdict in six tokens; whatever it wrote is kept as written.
    assert judgement.status in ("ok", "unparsed") and judgement.raw_ab and judgement.raw_ba
    assert (judgement.label is None) == (judgement.status == "unparsed")


# A stand-in for the server process, for the life cycle alone: answers /health, and starts a child of its own
# (as a server with workers would) whose pid it logs, so the test can see that nothing outlives the block.
FAKE_SERVER = """
import subprocess, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("child", child.pid, flush=True)
class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too; it only waits for its parent to read its status.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def test_local_server_life_cycle(monkeypatch, tmp_path: Path) -> None:
    """The server runs for its block only, its children with it, even when the block raises; a server that
    exits before answering is an error that quotes its log."""
    import sys

    import rrhf.judging.server as server_module

    monkeypatch.setattr(
        server_module, "server_command", lambda folder, host, port, **kw: [sys.executable, "-c", FAKE_SERVER, str(port)]
    )
    with pytest.raises(KeyError), server_module.local_server(str(tmp_path), log_path=tmp_path / "s.log") as server:
        assert httpx.get(server.base_url.removesuffix("/v1") + "/health").status_code == 200
        deadline = time.monotonic() + 10
        while "child" not in server.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(server.log_path.read_text().split()[1])
        assert _alive(child)
        raise KeyError("the block fails")
    assert server.process.poll() is not None
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)

    monkeypatch.setattr(
        server_module,
        "server_command",
        lambda folder, host, port, **kw: [sys.executable, "-c", "print('no model here'); exit(3)"],
    )
    with pytest.raises(RuntimeError, match=r"exited with code 3(.|\n)*no model here"):
        with server_module.local_server(str(tmp_path)):
            pass
