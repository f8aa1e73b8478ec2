"""DPO, SimPO and CPO: the pair rules, the losses against TRL's trainers, training, resume and the pipeline.

The equality tests run TRL 1.16's own trainers (the `test` extra pins it) on the same token ids as ours:
`trl.DPOTrainer.compute_loss` for DPO (an explicit reference model) and the CPO trainer
(`trl.experimental.cpo.CPOTrainer.compute_loss`) with loss_type="sigmoid" for CPO and "simpo" (cpo_alpha 0)
for SimPO. Both run with our transformers; each gets a batch built by its own collator from the token ids our
collator made, so only the loss computation differs: TRL right-pads one row per (prompt, response), ours
packs each prompt once with its responses (rrhf.logprobs' shared layout).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from rrhf.assets import build_tiny_model, default_data_dir
from rrhf.data import load_split, write_training_file
from rrhf.pairwise import (
    PairwiseCollator,
    dataset_slots,
    group_pairs,
    pair_examples,
    pairwise_loss,
    reference_sums,
)
from rrhf.trainer import PairwiseArguments, PairwiseTrainer
from rrhf.training import last_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"dpo": {"beta": 0.1}, "simpo": {"beta": 2.5, "gamma": 1.375}, "cpo": {"beta": 0.1, "alpha": 1.0}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The tiny LLaMA of the smoke runs, and 6 training groups of the offline data: a sampled-like
    candidate (another prompt's continuation), then the data set's chosen and rejected, with rewards."""
    root = tmp_path_factory.mktemp("pairwise")
    build_tiny_model(root / "model")
    rows = load_split(default_data_dir(), "train", limit=7)
    scores = [
        [1.0, 0.3, -0.2],
        [-0.1, 0.9, -0.8],
        [0.0, 0.9, -0.8],
        [0.5, 0.5, 0.5],
        [0.2, 0.9, -0.8],
        [0.3, -0.9, 0.8],
    ]  # the fourth group ties throughout
    records = [
        {
            "query": row["prompt"],
            "responses": [rows[i + 1]["chosen"][:80], row["chosen"], row["rejected"]],
            "scores": scores[i],
        }
        for i, row in enumerate(rows[:6])
    ]
    return root / "model", records


def test_pair_rules() -> None:
    assert group_pairs([0.2, 0.9, -0.5, 0.9], "best_worst") == [(1, 2)]  # first of tied maxima
    assert group_pairs([0.3, 0.3], "best_worst") == []  # all tied: skipped
    assert sorted(group_pairs([0.2, 0.9, 0.2], "all")) == [(1, 0), (1, 2)]  # equal rewards make no pair
    assert len(group_pairs([1.0, 2.0, 3.0, 4.0], "all")) == 6
    # DP groups end with the data set's chosen, then rejected; the data set's label wins over the reward.
    assert group_pairs([0.1, 0.2, -0.9, 0.8], "dataset", dataset_responses=["chosen", "rejected"]) == [(2, 3)]
    assert dataset_slots(6, ["rejected", "chosen"]) == (5, 4)
    with pytest.raises(ValueError, match="sampling.dataset_responses"):
        group_pairs([0.1, 0.2], "dataset", dataset_responses=["chosen"])
    with pytest.raises(ValueError, match="pairs must be one of"):
        group_pairs([0.1, 0.2], "some")


def test_pair_examples_keep_used_responses_and_count_ties() -> None:
    records = [
        {"query": "q1", "responses": ["a", "b", "c"], "scores": [0.1, 0.5, 0.3]},
        {"query": "q2", "responses": ["d", "e"], "scores": [0.2, 0.2]},
    ]
    examples, stats = pair_examples(records, "best_worst")
    assert examples == [{"query": "q1", "responses": ["a", "b"], "pairs": [[1, 0]]}]
    assert stats | {} == {
        "pairs_rule": "best_worst",
        "prompts": 2,
        "prompts_with_pairs": 1,
        "skipped_ties": 1,
        "pairs": 1,
        "responses_used_per_prompt": 1.0,
    }
    examples, stats = pair_examples(records, "all")
    assert examples[0]["responses"] == ["a", "b", "c"] and len(examples[0]["pairs"]) == 3
    assert stats["responses_used_per_prompt"] == 1.5 and stats["skipped_ties"] == 1


def test_losses_on_known_numbers() -> None:
    c, r = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    lc, lr = torch.tensor([5, 2]), torch.tensor([4, 3])
    dpo = pairwise_loss(
        "dpo", c, r, lc, lr, beta=0.5, ref_chosen=torch.tensor([-11.0, -4.0]), ref_rejected=torch.tensor([-11.0, -4.0])
    )
    margins = torch.tensor([0.5 * (1 + 1), 0.5 * (0 - 1)])
    torch.testing.assert_close(dpo.margin, margins)
    torch.testing.assert_close(dpo.loss, -torch.nn.functional.logsigmoid(margins).mean())
    simpo = pairwise_loss("simpo", c, r, lc, lr, beta=2.0, gamma=0.5)
    margins = 2.0 * torch.tensor([-10 / 5 + 12 / 4, -4 / 2 + 3 / 3])
    torch.testing.assert_close(simpo.loss, -torch.nn.functional.logsigmoid(margins - 0.5).mean())
    cpo = pairwise_loss("cpo", c, r, lc, lr, beta=0.1, alpha=2.0)
    torch.testing.assert_close(cpo.nll, torch.tensor(14.0 / 7))  # a mean over the chosen tokens of the batch
    torch.testing.assert_close(cpo.loss, cpo.preference.mean() + 2.0 * cpo.nll)
    with pytest.raises(ValueError, match="reference"):
        pairwise_loss("dpo", c, r, lc, lr, beta=0.1)


def _perturbed(model_dir: Path) -> torch.nn.Module:
    # A policy away from the reference, so that DPO's log-ratios are not all zero.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def _trl_rows(batch: dict) -> list[dict]:
    """One TRL row per pair, from our batch's token ids: (prompt, chosen, rejected)."""
    rows = []
    for g, c, r in batch["pairs"].tolist():
        query, responses = batch["groups"][g]
        rows.append(
            {"prompt_ids": query.tolist(), "chosen_ids": responses[c].tolist(), "rejected_ids": responses[r].tolist()}
        )
    return rows


def _trl_loss(loss: str, policy, reference, tokenizer, batch: dict, records: list[dict], out: Path) -> torch.Tensor:
    from datasets import Dataset

    text = Dataset.from_list(
        [{"prompt": r["query"], "chosen": r["responses"][0], "rejected": r["responses"][1]} for r in records]
    )
    common = {"output_dir": str(out), "use_cpu": True, "bf16": False, "report_to": [], "disable_tqdm": True}
    rows = _trl_rows(batch)
    if loss == "dpo":
        from trl import DPOConfig, DPOTrainer
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            train_dataset=text,
            processing_class=tokenizer,
            args=DPOConfig(beta=SETTINGS["dpo"]["beta"], loss_type=["sigmoid"], **common),
        )
        inputs = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        options = (
            {
                "loss_type": "simpo",
                "beta": SETTINGS["simpo"]["beta"],
                "simpo_gamma": SETTINGS["simpo"]["gamma"],
                "cpo_alpha": 0.0,
            }
            if loss == "simpo"
            else {"loss_type": "sigmoid", "beta": SETTINGS["cpo"]["beta"], "cpo_alpha": SETTINGS["cpo"]["alpha"]}
        )
        trainer = CPOTrainer(
            model=policy,
            train_dataset=text,
            processing_class=tokenizer,
            args=CPOConfig(max_length=1024, **options, **common),
        )
        features = []
        for row in rows:
            feature = {}
            for side in ("chosen", "rejected"):
                ids = row["prompt_ids"] + row[f"{side}_ids"]
                feature |= {
                    f"{side}_input_ids": ids,
                    f"{side}_attention_mask": [1] * len(ids),
                    f"{side}_labels": [-100] * len(row["prompt_ids"]) + row[f"{side}_ids"],
                }
            features.append(feature)
        inputs = trainer.data_collator(features)
    return trainer.compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("pairs", ["best_worst", "all"])
@pytest.mark.parametrize("loss", ["dpo", "simpo", "cpo"])
def test_loss_and_gradient_equal_trl(tiny, tmp_path, loss: str, pairs: str) -> None:
    model_dir, records = tiny
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ours = _perturbed(model_dir)
    theirs = copy.deepcopy(ours)
    collator = PairwiseCollator(tokenizer)
    examples, _ = pair_examples(records, pairs)
    if loss == "dpo":
        for example, sums in zip(examples, reference_sums(reference, collator, examples, batch_size=4)):
            example["reference"] = sums
    batch = collator(examples)
    assert len(batch["pairs"]) > len(examples) or pairs == "best_worst"  # "all": several pairs share a prompt

    args = PairwiseArguments(
        output_dir=str(tmp_path / "ours"),
        loss=loss,
        **SETTINGS[loss],
        use_cpu=True,
        bf16=False,
        report_to=[],
        disable_tqdm=True,
    )
    loss_ours = PairwiseTrainer(model=ours, args=args, processing_class=tokenizer).compute_loss(ours, batch)
    loss_ours.backward()
    loss_theirs = _trl_loss(loss, theirs, copy.deepcopy(reference), tokenizer, batch, records, tmp_path / "trl")
    loss_theirs.backward()

    torch.testing.assert_close(loss_ours.detach(), loss_theirs.detach(), atol=1e-5, rtol=0)
    grads_theirs = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads_theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    assert any(p.grad.abs().max() > 1e-4 for p in ours.parameters())


def test_trl_tokenises_the_text_as_our_collator_does(tiny) -> None:
    """The equality tests feed TRL our token ids; on this tokenizer TRL's own tokenisation gives the same."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model_dir, records = tiny
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = pair_examples(records, "best_worst")
    text = Dataset.from_list(
        [
            {"prompt": e["query"], "chosen": e["responses"][c], "rejected": e["responses"][r]}
            for e in examples
            for c, r in e["pairs"]
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        train_dataset=text,
        processing_class=tokenizer,
        args=DPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[]),
    )
    assert [
        {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in trainer.train_dataset
    ] == _trl_rows(PairwiseCollator(tokenizer)(examples))


def _args(out: Path, loss: str, **overrides) -> PairwiseArguments:
    options = {
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "num_train_epochs": 2,
        "save_steps": 3,
        "logging_steps": 1,
        "report_to": [],
        "disable_tqdm": True,
        "lr_scheduler_type": "constant",
        **overrides,
    }
    return PairwiseArguments(output_dir=str(out / "checkpoints"), seed=0, loss=loss, **SETTINGS[loss], **options)


class StopAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("killed after step 3")


def test_dpo_trains_caches_its_reference_and_resumes_exactly(tiny, tmp_path) -> None:
    model_dir, records = tiny
    train_file = tmp_path / "train.jsonl"
    write_training_file(train_file, records)
    whole = train(model_dir, train_file, tmp_path / "whole", args=_args(tmp_path / "whole", "dpo"))
    history = [h for h in json.loads((tmp_path / "whole" / "log_history.json").read_text()) if "loss" in h]
    assert history[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy = reference at step 1: log 2
    assert history[-1]["reward_margin"] > 0.1 and history[-1]["reward_accuracy"] == 1.0
    stats = json.loads((tmp_path / "whole" / "pairs.json").read_text())
    assert stats["prompts"] == 6 and stats["skipped_ties"] == 1 and stats["pairs"] == 5

    # The cached reference is the initial policy's summed log-probs of each example's responses.
    cache = [json.loads(line) for line in (tmp_path / "whole" / "reference_logprobs.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = pair_examples(records, "best_worst")
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = reference_sums(initial, PairwiseCollator(tokenizer), examples, batch_size=5)
    assert len(cache) == len(examples)
    for got, want in zip(cache, expected):
        assert got == pytest.approx(want, abs=1e-4)

    parts = tmp_path / "parts"
    with pytest.raises(RuntimeError, match="killed after step 3"):
        train(model_dir, train_file, parts, args=_args(parts, "dpo"), callbacks=[StopAfterSave()])
    assert last_checkpoint(parts / "checkpoints").endswith("checkpoint-3")
    resumed = train(model_dir, train_file, parts, args=_args(parts, "dpo"))
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)

    (parts / "reference_logprobs.jsonl").unlink()  # a checkpoint without its reference cannot resume
    (parts / "model").rename(parts / "model.old")
    with pytest.raises(RuntimeError, match="without its cached reference"):
        train(model_dir, train_file, parts, args=_args(parts, "dpo", num_train_epochs=3))


def _data_loss(model_dir: Path, records: list[dict], loss: str, tmp: Path) -> float:
    """The loss over every pair of `records` under the model in `model_dir` (no reference: SimPO, CPO)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = PairwiseCollator(tokenizer)(pair_examples(records, "best_worst")[0])
    trainer = PairwiseTrainer(model=model, args=_args(tmp, loss), processing_class=tokenizer)
    with torch.no_grad():
        return trainer.compute_loss(model, batch).item()


@pytest.mark.parametrize("loss", ["simpo", "cpo"])
def test_reference_free_losses_learn(tiny, tmp_path, loss: str) -> None:
    model_dir, records = tiny
    train_file = tmp_path / "train.jsonl"
    write_training_file(train_file, records)
    final = train(model_dir, train_file, tmp_path, args=_args(tmp_path, loss, num_train_epochs=4))
    before, after = (_data_loss(m, records, loss, tmp_path) for m in (model_dir, final))
    assert after < 0.95 * before, (before, after)
    assert not (tmp_path / "reference_logprobs.jsonl").exists()  # no reference model


def test_arguments_name_the_missing_setting(tmp_path) -> None:
    with pytest.raises(ValueError, match="method.train_args.gamma"):
        PairwiseArguments(output_dir=str(tmp_path), loss="simpo", beta=2.0, use_cpu=True)
    with pytest.raises(ValueError, match="method.pairs"):
        PairwiseArguments(output_dir=str(tmp_path), loss="dpo", beta=0.1, pairs="best", use_cpu=True)


@pytest.mark.slow
def test_every_method_and_pair_rule_runs_through_run_py(tmp_path) -> None:
    """One sweep: DPO, SimPO and CPO with each pair rule on the smoke settings, sharing sampling and scoring."""
    env = {**os.environ, "RRHF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "experiment=smoke",
        "method=dpo,simpo,cpo",
        "method.pairs=best_worst,all,dataset",
        f"paths.artifacts={tmp_path}/artifacts",
        f"paths.results={tmp_path}/results",
        f"paths.tables={tmp_path}/tables",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = list((tmp_path / "results").rglob("metrics.json"))
    assert len(runs) == 9
    artifacts = tmp_path / "artifacts"
    assert len(list(artifacts.glob("sample/*/DONE"))) == len(list(artifacts.glob("score/*/DONE"))) == 1
    trained = sorted(artifacts.glob("train/*/DONE"))
    assert len(trained) == 9
    rules = {}
    for done in trained:
        folder = done.parent
        inputs = json.loads((folder / "inputs.json").read_text())["method"]
        stats = json.loads((folder / "pairs.json").read_text())
        rules[(inputs["loss"], stats["pairs_rule"])] = stats
        assert (folder / "reference_logprobs.jsonl").exists() == (inputs["loss"] == "dpo")
    assert set(rules) == {(m, p) for m in ("dpo", "simpo", "cpo") for p in ("best_worst", "all", "dataset")}
    assert rules["dpo", "dataset"]["responses_used_per_prompt"] == 2.0
    assert rules["dpo", "all"]["pairs"] > rules["dpo", "best_worst"]["pairs"]
    for path in runs:
        metrics = json.loads(path.read_text())
        assert metrics["final"]["artifact"] != metrics["initial"]["artifact"]
        assert "rm_accuracy_paper" in metrics["final"]
