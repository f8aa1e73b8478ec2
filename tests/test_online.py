"""OP-k: re-sampling by the policy being trained, the KL-shaped reward, late collation and exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rrhf.assets import resolve_model
from rrhf.collator import RRHFCollator, tokenize_example
from rrhf.generation import generate_batch
from rrhf.online import OnlineCandidates, OnlineSettings, Schedule, refresh_statistics
from rrhf.trainer import RRHFArguments
from rrhf.training import train

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    {"prompt": "the movie was", "chosen": "very good fun", "rejected": "dull and bad"},
    {"prompt": "a film with a plot that", "chosen": "is great", "rejected": "is awful"},
    {"prompt": "acting", "chosen": "was great", "rejected": "was not fun"},
    {"prompt": "the plot is", "chosen": "good", "rejected": "bad"},
]
SAMPLING = OmegaConf.create(
    {
        "name": "OP-test",
        "generator": "diverse_beam",
        "dataset_responses": ["chosen", "rejected"],
        "num_candidates": 2,
        "num_beams": 2,
        "num_beam_groups": 2,
        "diversity_penalty": 1.0,
        "top_p": 1.0,
        "temperature": 1.0,
        "max_new_tokens": 5,
        "max_prompt_tokens": 64,
        "batch_size": 2,
    }
)


class LengthScorer:
    """Reward = number of characters: deterministic and different for different responses."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(len(r)) for r in responses]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    os.environ["RRHF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return resolve_model("embedded:tiny")


def _sequence_logprob(model, query: list[int], response: list[int]) -> float:
    """log p(response | query) by one plain forward over the concatenation."""
    ids = torch.tensor([query + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][len(query) - 1 :].sum().item()


def test_refresh_resamples_keeps_dataset_responses_and_applies_the_kl_term(tiny: str, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    policy = AutoModelForCausalLM.from_pretrained(tiny)
    torch.manual_seed(1)
    with torch.no_grad():  # a policy that has moved away from rho
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = AutoModelForCausalLM.from_pretrained(tiny).eval()
    start = [{"query": r["prompt"], "responses": ["x", "y"], "scores": [0.0, 1.0]} for r in ROWS]
    beta = 0.5
    online = OnlineCandidates(
        start,
        ROWS,
        SAMPLING,
        LengthScorer(),
        RRHFCollator(tokenizer),
        refresh_steps=3,
        kl_coef=beta,
        reference=reference,
        log_dir=tmp_path / "online",
    )
    assert not online.due(0) and not online.due(2) and online.due(3) and online.due(6)
    online.refresh(policy, 3)

    expected = []
    for start_at in range(0, len(ROWS), SAMPLING.batch_size):
        expected += generate_batch(
            policy.eval(), tokenizer, [r["prompt"] for r in ROWS[start_at : start_at + 2]], SAMPLING, seed=0
        )
    for record, row, sampled in zip(online.records, ROWS, expected):
        assert record["responses"] == sampled + [row["chosen"], row["rejected"]]
        t = tokenize_example(record, tokenizer)
        for response, ids, score in zip(record["responses"], t["responses_ids"], record["scores"]):
            ratio = _sequence_logprob(policy, t["query_ids"], ids) - _sequence_logprob(reference, t["query_ids"], ids)
            assert abs(ratio) > 1e-4
            assert score == pytest.approx(len(response) - beta * ratio, abs=1e-4)
    kept = [json.loads(line) for line in (tmp_path / "online" / "step-3.rank0-of-1.jsonl").read_text().splitlines()]
    assert [k["responses"] for k in kept] == [r["responses"] for r in online.records]
    assert [k["index"] for k in kept] == list(range(len(ROWS)))
    assert refresh_statistics(tmp_path / "online")[0]["step"] == 3


def test_each_step_trains_on_the_candidates_of_the_latest_refresh(tiny: str, tmp_path: Path) -> None:
    # accelerate fetches a batch ahead: the step after a refresh must still see the refreshed candidates.
    start = tmp_path / "start.jsonl"
    with open(start, "w") as handle:
        for r in ROWS:
            handle.write(
                json.dumps({"query": r["prompt"], "responses": ["initial one", "initial two"], "scores": [0.0, 1.0]})
                + "\n"
            )
    seen: list[list[list[str]]] = []
    original = RRHFCollator.__call__

    def spy(self, examples):
        seen.append([e["responses"] for e in examples])
        return original(self, examples)

    args = RRHFArguments(
        output_dir=str(tmp_path / "checkpoints"),
        use_cpu=True,
        max_steps=3,
        save_steps=100,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    settings = OnlineSettings(rows=ROWS, sampling=SAMPLING, scorer=LengthScorer(), refresh_steps=1)
    RRHFCollator.__call__ = spy
    try:
        train(tiny, start, tmp_path, args=args, online=settings)
    finally:
        RRHFCollator.__call__ = original
    assert len(seen) == 3 and all(r[:2] == ["initial one", "initial two"] for r in seen[0])
    for step, batch in zip((1, 2), seen[1:]):
        refreshed = [
            json.loads(line)["responses"]
            for line in (tmp_path / "online" / f"step-{step}.rank0-of-1.jsonl").read_text().splitlines()
        ]
        assert sorted(map(tuple, batch)) == sorted(map(tuple, refreshed))


def _run(
    tmp: Path, *overrides: str, crash_at: str | None = None, sampling: str = "OP-32+KL"
) -> subprocess.CompletedProcess:
    env = {**os.environ, "RRHF_CACHE": str(tmp.parent / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("RRHF_CRASH_AT", None)
    if crash_at:
        env["RRHF_CRASH_AT"] = crash_at
    cmd = [
        sys.executable,
        "run.py",
        "experiment=smoke",
        f"sampling={sampling}",
        "sampling.refresh_steps=2",
        "trainer.args.max_steps=4",
        "trainer.args.save_steps=3",
        f"paths.artifacts={tmp}/artifacts",
        f"paths.results={tmp}/results",
        f"paths.tables={tmp}/tables",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _metrics(tmp: Path) -> dict:
    metrics = json.loads(next((tmp / "results").rglob("metrics.json")).read_text())
    return {k: {m: v for m, v in metrics[k].items() if m != "artifact"} for k in ("initial", "final")} | {
        "refreshes": metrics["iterations"][0]["refreshes"]
    }


@pytest.mark.slow
def test_op_run_killed_after_a_checkpoint_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir()
    broken.mkdir()
    assert (done := _run(whole)).returncode == 0, done.stderr[-3000:]
    reference = _metrics(whole)
    assert [r["step"] for r in reference["refreshes"]] == [2]
    assert reference["refreshes"][0]["log_ratio_mean"] != 0.0  # the KL term is active
    assert (killed := _run(broken, crash_at="train")).returncode == -9, killed.stderr[-3000:]
    # Killed after checkpoint 3, past the refresh at step 2: the resumed run must train steps 4 on the
    # step-2 candidates.
    assert list((broken / "artifacts" / "train").glob("*.partial/checkpoints/checkpoint-3"))
    assert (resumed := _run(broken)).returncode == 0, resumed.stderr[-3000:]
    assert _metrics(broken) == reference
    weights = [load_file(next((t / "artifacts" / "train").glob("*/model/model.safetensors"))) for t in (whole, broken)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_table10_op_setting_refreshes_its_top_k_candidates(tmp_path: Path) -> None:
    done = _run(tmp_path, "sampling.refresh_steps=1", "sampling.max_prompt_tokens=32", sampling="imdb_OP-128+KL")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "results").rglob("metrics.json")).read_text())
    assert [r["step"] for r in metrics["iterations"][0]["refreshes"]] == [1, 2, 3]
    kept = next((tmp_path / "artifacts" / "train").glob("*/online/step-3.*.jsonl")).read_text().splitlines()
    assert all(len(json.loads(line)["responses"]) == 5 for line in kept)  # 4 top-k samples + the continuation
    table = (tmp_path / "tables" / "table10.csv").read_text()
    assert "rrhf-OP-128-kl_0.1" in table


def test_schedule_knows_which_prompts_each_step_trains_on(tiny: str, tmp_path: Path, monkeypatch) -> None:
    """A refresh draws for the prompts of the coming steps: the Schedule must predict exactly what the Trainer
    feeds, across epoch ends and an uneven last accumulation."""
    from rrhf.online import OnlineRRHFTrainer

    start = tmp_path / "start.jsonl"
    with open(start, "w") as handle:
        for r in ROWS:
            handle.write(json.dumps({"query": r["prompt"], "responses": ["a", "b"], "scores": [0.0, 1.0]}) + "\n")
    trained: dict[int, set[int]] = {}
    original = OnlineRRHFTrainer.training_step

    def spy(self, model, inputs, num_items_in_batch=None):
        trained.setdefault(self.state.global_step, set()).update(inputs["indices"])
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(OnlineRRHFTrainer, "training_step", spy)
    # 4 prompts, 1 a micro-batch, 3 micro-batches a step: steps of 3 and 1 prompts alternate over epochs.
    args = RRHFArguments(
        output_dir=str(tmp_path / "checkpoints"),
        use_cpu=True,
        max_steps=5,
        save_steps=100,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=3,
        report_to="none",
        disable_tqdm=True,
        seed=7,
    )
    settings = OnlineSettings(rows=ROWS, sampling=SAMPLING, scorer=LengthScorer(), refresh_steps=2)
    train(tiny, start, tmp_path, args=args, online=settings)
    schedule = Schedule(len(ROWS), per_device=1, accumulation=3, seed=7)
    assert sorted(trained) == [0, 1, 2, 3, 4]
    assert [len(trained[s]) for s in range(5)] == [3, 1, 3, 1, 3]
    for step in range(5):
        assert schedule.prompts_for_steps(step, 1) == sorted(trained[step])
    refreshed = {
        int(p.name.split(".")[0][5:]): {json.loads(line)["index"] for line in p.open()}
        for p in (tmp_path / "online").glob("step-*.jsonl")
    }
    assert refreshed == {2: trained[2] | trained[3], 4: trained[4]}
