"""Judges beyond a reward model: an LLM behind an OpenAI-compatible chat endpoint, its cache, and a local server.

    from rrhf.judging import JudgeCache, local_server, pairwise_judgements

    with local_server("embedded:smollm2") as server:
        client = server.client(cache=JudgeCache("artifacts/judge_cache"), max_tokens=256)
        judgements = pairwise_judgements(client, [(prompt, response_a, response_b), ...])

A hosted model: `ChatClient("https://api.openai.com/v1", "gpt-4o", api_key_env="OPENAI_API_KEY", cache=...)`.
"""

from rrhf.judging.cache import JudgeCache, request_key
from rrhf.judging.client import ChatClient, ChatRequest, Completion, EndpointError
from rrhf.judging.judge import (
    MT_BENCH_PAIR,
    SINGLE_LETTER,
    TEMPLATES,
    PairJudgement,
    PairwiseTemplate,
    combine,
    judgement_from_answers,
    pair_requests,
    pairwise_judgements,
    parse_letter,
    parse_verdict,
    summarise,
    template_by_id,
)
from rrhf.judging.server import LocalServer, free_port, local_server

__all__ = [
    "MT_BENCH_PAIR",
    "SINGLE_LETTER",
    "TEMPLATES",
    "ChatClient",
    "ChatRequest",
    "Completion",
    "EndpointError",
    "JudgeCache",
    "LocalServer",
    "PairJudgement",
    "PairwiseTemplate",
    "combine",
    "free_port",
    "judgement_from_answers",
    "local_server",
    "pair_requests",
    "pairwise_judgements",
    "parse_letter",
    "parse_verdict",
    "request_key",
    "summarise",
    "template_by_id",
]
