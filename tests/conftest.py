import os

import pytest

# Tests never reach the Hugging Face Hub: a Hub name fails at once instead of retrying for ~45 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
