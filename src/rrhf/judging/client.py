"""A chat-completions client for any OpenAI-compatible endpoint (a hosted API, `vllm serve`, `transformers serve`).

httpx rather than the `openai` package: the client needs its own retry policy (bounded, Retry-After honoured,
one clear error naming the endpoint) and its own cache in front of every request, and the SDK would add a second,
hidden retry loop and a large dependency to every install, for one POST and one JSON field. httpx is what the SDK
itself uses underneath.

`base_url` follows the SDK's convention: it includes the API prefix (`https://api.openai.com/v1`,
`http://127.0.0.1:8000/v1`), and requests go to `{base_url}/chat/completions`.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm.auto import tqdm

from rrhf.judging.cache import JudgeCache, request_key

log = logging.getLogger(__name__)
# httpx logs every request at INFO: hundreds of lines per judging stage in a run's log, where the progress bar and
# this module's warnings (failures, retries) already say what happened.
logging.getLogger("httpx").setLevel(logging.WARNING)

Message = Mapping[str, str]

# The statuses worth retrying, as the OpenAI SDK counts them: timeouts (408), lock conflicts (409), rate limits
# (429) and server errors. Any other 4xx is the request's fault and fails at once.
RETRY_STATUSES = frozenset({408, 409, 429})


class EndpointError(RuntimeError):
    """A request that failed for good: names the endpoint, the model, how many attempts were made and the last
    HTTP status or connection error."""

    def __init__(self, url: str, model: str, attempts: int, cause: str, status: int | None = None) -> None:
        self.url, self.model, self.attempts, self.cause, self.status = url, model, attempts, cause, status
        super().__init__(f"chat endpoint {url} (model {model!r}) failed after {attempts} attempt(s): {cause}")


@dataclass(frozen=True)
class ChatRequest:
    """One request: its messages, the id@version of the prompt template that built them (part of the cache key,
    so a new template version asks again) and parameters that override the client's for this request."""

    messages: Sequence[Message]
    template: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    """The model's answer as returned (never parsed here), and whether it came from the cache."""

    content: str
    finish_reason: str | None
    cached: bool
    key: str


@dataclass
class ClientStats:
    requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    failures: int = 0  # requests that raised EndpointError


class ChatClient:
    """Chat completions from one model behind one endpoint, cached and retried.

    `model` is the name sent to the endpoint; `model_id` is the model's identity in cache keys (default: `model`).
    They differ for a local server, where the name is a folder path and the identity the weights' version.
    The API key is read from the environment variable `api_key_env` when it is set; a local server needs none.
    Retries: `max_retries` more attempts after the first, on connection errors, timeouts, 408/409/429 and 5xx,
    waiting `backoff_base * 2**n` seconds (with jitter, at most `backoff_max`) or what the server's Retry-After
    asks (at most `max_retry_after`).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        model_id: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int | None = None,
        params: Mapping[str, Any] | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_retry_after: float = 300.0,
        cache: JudgeCache | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.model_id = model_id or model
        self.api_key_env = api_key_env
        self.params: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens, **(params or {})}
        self.max_retries = max_retries
        self.backoff_base, self.backoff_max, self.max_retry_after = backoff_base, backoff_max, max_retry_after
        self.cache = cache
        self.stats = ClientStats()
        self._sleep = sleep
        self._stats_lock = threading.Lock()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            # Enough pooled connections for the widest `complete_many`; the default pool (10) would queue them.
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_params(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The parameters a request is sent with (and cached under): the client's, then the request's."""
        merged = {**self.params, **(overrides or {})}
        return {k: v for k, v in merged.items() if v is not None}

    def key(self, request: ChatRequest) -> str:
        return request_key(self.model_id, request.template, request.messages, self.request_params(request.params))

    def uncached(self, requests: Sequence[ChatRequest]) -> list[int]:
        """Indices of the requests the cache cannot answer (all of them without a cache): when none is left, a
        caller can skip starting a server at all."""
        if self.cache is None:
            return list(range(len(requests)))
        return [i for i, r in enumerate(requests) if not self.cache.path(self.key(r)).exists()]

    def complete(
        self, messages: Sequence[Message], *, template: str = "", params: Mapping[str, Any] | None = None
    ) -> Completion:
        """One answer: from the cache when this exact request was answered before, else from the endpoint."""
        return self.complete_request(ChatRequest(list(messages), template, dict(params or {})))

    def complete_request(self, request: ChatRequest) -> Completion:
        params = self.request_params(request.params)
        key = request_key(self.model_id, request.template, request.messages, params)
        if self.cache is not None:
            answer = self.cache.get(key)
            if answer is not None:
                return Completion(answer["content"], answer.get("finish_reason"), True, key)
        body = {"model": self.model, "messages": [dict(m) for m in request.messages], **params}
        try:
            data = self._post(body)
        except EndpointError:
            with self._stats_lock:
                self.stats.failures += 1
            raise
        choice = data["choices"][0]
        # A refusal or tool call can come back without text content: stored as "", which no parser reads as a label.
        content = (choice.get("message") or {}).get("content") or ""
        answer = {"content": content, "finish_reason": choice.get("finish_reason"), "usage": data.get("usage")}
        if self.cache is not None:
            self.cache.put(
                key,
                {
                    "model": self.model_id,
                    "endpoint": self.url,
                    "template": request.template,
                    "messages": body["messages"],
                    "params": params,
                },
                answer,
            )
        return Completion(content, answer["finish_reason"], False, key)

    def complete_many(
        self,
        requests: Sequence[ChatRequest],
        *,
        concurrency: int = 4,
        progress: bool = True,
        desc: str = "chat",
        max_failures: int | None = None,
    ) -> list[Completion | EndpointError]:
        """Answers to `requests`, in order, with at most `concurrency` in flight; a request that failed for good is
        its EndpointError in the list. Identical requests are sent once. Past `max_failures` failures the
        remaining requests are dropped and an EndpointError is raised (an endpoint that is down would otherwise
        cost every request its full back-off)."""
        keys = [self.key(r) for r in requests]
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        results: dict[str, Completion | EndpointError] = {}
        failures = cached = 0
        bar = tqdm(total=len(first), desc=desc, disable=not progress, unit="req")
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="chat")
        try:
            pending: dict[Future[Completion], str] = {
                pool.submit(self.complete_request, requests[i]): key for key, i in first.items()
            }
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    key = pending.pop(future)
                    try:
                        result = future.result()
                        cached += result.cached
                    except EndpointError as error:
                        result = error
                        failures += 1
                        log.warning("%s", error)
                    results[key] = result
                    bar.update(1)
                    bar.set_postfix(failed=failures, cached=cached, refresh=False)
                if max_failures is not None and failures > max_failures:
                    last = next(r for r in reversed(results.values()) if isinstance(r, EndpointError))
                    raise EndpointError(
                        self.url,
                        self.model,
                        last.attempts,
                        f"{failures} requests failed (more than max_failures={max_failures}); "
                        f"{len(pending)} not sent; last: {last.cause}",
                        last.status,
                    )
        finally:
            # Requests not yet started are dropped; those in flight end on their own (bounded by their retries).
            pool.shutdown(wait=False, cancel_futures=True)
            bar.close()
        return [results[key] for key in keys]

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        attempts = 1 + max(0, self.max_retries)
        for attempt in range(attempts):
            with self._stats_lock:
                self.stats.requests += 1
            retry_after: float | None = None
            try:
                response = self._http.post(self.url, json=body)
            except httpx.TransportError as error:  # refused, reset, DNS, timeouts
                cause, status = f"{type(error).__name__}: {error or 'no detail'}", None
            else:
                status = response.status_code
                if status == 200:
                    try:
                        data = response.json()
                        data["choices"][0]
                        return data
                    except (ValueError, KeyError, IndexError, TypeError):
                        raise EndpointError(
                            self.url,
                            self.model,
                            attempt + 1,
                            f"HTTP 200 without a chat completion in the body: {response.text[:300]!r}",
                            status,
                        ) from None
                cause = f"HTTP {status}: {response.text[:300].strip()}"
                if status not in RETRY_STATUSES and status < 500:
                    if status in (401, 403):
                        where = f"${self.api_key_env}" if self.api_key_env else "no variable (api_key_env=None)"
                        cause += f" (the API key is read from {where})"
                    raise EndpointError(self.url, self.model, attempt + 1, cause, status)
                retry_after = _retry_after(response.headers)
            if attempt + 1 == attempts:
                raise EndpointError(self.url, self.model, attempts, f"last error {cause}", status)
            delay = self._delay(attempt, retry_after)
            log.info(
                "chat endpoint %s: %s; retry %d/%d in %.1f s", self.url, cause, attempt + 1, self.max_retries, delay
            )
            with self._stats_lock:
                self.stats.retries += 1
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(0.0, retry_after), self.max_retry_after)
        # Jitter spreads the retries of concurrent requests that failed together, so they do not return together.
        return min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asks to wait: `retry-after-ms` (OpenAI's), `Retry-After` in seconds or as a date."""
    if "retry-after-ms" in headers:
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
