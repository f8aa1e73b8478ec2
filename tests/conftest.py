import os
import subprocess
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub: a Hub name fails at once instead of retrying for ~45 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest-xdist workers on a 2-core machine: each worker, and every process its tests
# start (run.py, torchrun ranks), gets one torch thread, since two workers of two threads each on two cores
# wait on each other's spinning threads and run slower than one worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def stand_in_hub(tmp_path_factory: pytest.TempPathFactory):
    """The stand-in Hub (tests/fixtures/hub.py: every repository a paper config names), served for the session;
    yields (FakeHub, endpoint)."""
    from fixtures.hub import FakeHub, paper_repositories

    work = tmp_path_factory.mktemp("stand-ins")
    hub = FakeHub()
    for (kind, repo_id), files in paper_repositories(work / "build").items():
        hub.push(kind, repo_id, files)
    with hub.serve() as endpoint:
        yield hub, endpoint


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One `run.py experiment=smoke` (the tiny model through every stage), built once per test process and read
    by the tests of several modules (its outputs, a free rerun, the reference that a crashed and resumed run must
    equal); yields (folder, the finished process). Its folder holds artifacts/, results/ and tables/; the model
    cache is the folder's parent's cache/, as in the modules' own `_run` helpers, so a rerun there is free.
    Tests read it, rerun it with the same overrides, or write beside it; none changes what it built."""
    from fixtures.runs import run_py

    tmp = tmp_path_factory.mktemp("smoke")
    return tmp, run_py(tmp, "experiment=smoke", cache=tmp.parent / "cache", timeout=600)


@pytest.fixture
def stub():
    """start(replies) -> (Stub, base_url): a stub OpenAI-compatible endpoint for faults (tests/fixtures/endpoint.py)."""
    from fixtures.endpoint import stub_servers

    yield from stub_servers()


@pytest.fixture(scope="session")
def served():
    """The real local judge server (transformers serve of the embedded SmolLM2 folder) on 127.0.0.1, started once
    per test process for the tests that talk to it over HTTP."""
    pytest.importorskip("fastapi", reason="the local judge server needs the `judge` extra")
    pytest.importorskip("uvicorn", reason="the local judge server needs the `judge` extra")
    from rrhf.judging import local_server

    with local_server("embedded:smollm2") as server:
        yield server
    assert server.process.poll() is not None  # stopped on leaving the block


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In CI (`.ci/run`, which installs and starts every service the tests use: pdflatex, Chromium, a SLURM
    controller) a skipped test is a failure: a test must not pass CI by skipping for want of a service."""
    report = yield
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where .ci/run provides every service the tests need: {report.longrepr}"
    return report
