"""OP-k (Table 1): RRHF whose sampled candidates are re-drawn by the current policy every k optimiser steps.

Training starts from the DP candidates of the initial policy (the data set's responses stay in every
group). After every k optimiser steps the policy being trained generates new candidates with the same
generator and settings, and every candidate of the group is re-scored. With a KL coefficient beta the
score becomes R(x, y) - beta * log(pi(y|x) / rho(y|x)) (paper-notes section 4), where log pi and log rho are
the response's summed token log-probs under the current policy and the frozen initial model.

A batch's candidates are looked up when its step runs, not when the batch is fetched: accelerate's data
loader fetches one batch ahead, which would otherwise train one step on stale candidates after a refresh.
Every refresh is kept (`online/step-<k>.jsonl`); a run resumed from a checkpoint takes the candidates of
the last refresh before it from there, so it trains on exactly what an unbroken run did.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rrhf import tracking
from rrhf.artifacts import world_size, write_json_atomic
from rrhf.collator import RRHFCollator
from rrhf.data import read_jsonl, with_dataset_responses, write_jsonl
from rrhf.generation import eval_mode, generate_batch
from rrhf.logprobs import group_logprob_sums
from rrhf.reward import score_groups
from rrhf.stats import sample_statistics
from rrhf.trainer import RRHFTrainer

log = logging.getLogger(__name__)

_LOG_RATIO_BATCH = 4  # groups per forward when the KL term's log-ratios are taken

@dataclass
class OnlineSettings:
    """What an OP-k training run needs beyond the RRHF arguments: the prompts' rows (in training-file
    order), the sampling config (generator settings, dataset_responses), the scorer, k and beta."""

    rows: list[dict[str, Any]]
    sampling: Any
    scorer: Any
    refresh_steps: int
    kl_coef: float = 0.0
    seed: int = 0

    def candidates(self, records: list[dict[str, Any]], collator: RRHFCollator, model: torch.nn.Module,
                   log_dir: Path) -> OnlineCandidates:
        # rho is the model as loaded, before any training step (a resumed run loads checkpoint weights later).
        reference = copy.deepcopy(model).eval().requires_grad_(False) if self.kl_coef else None
        return OnlineCandidates(records, self.rows, self.sampling, self.scorer, collator,
                                refresh_steps=self.refresh_steps, kl_coef=self.kl_coef, reference=reference,
                                seed=self.seed, log_dir=log_dir)


class OnlineCandidates:
    """The training groups of an OP-k run, re-sampled and re-scored in place by `refresh`."""

    def __init__(self, records: list[dict[str, Any]], rows: list[dict[str, Any]], sampling: Any, scorer: Any,
                 collator: RRHFCollator, *, refresh_steps: int, kl_coef: float = 0.0,
                 reference: torch.nn.Module | None = None, seed: int = 0, log_dir: Path) -> None:
        if refresh_steps < 1:
            raise ValueError(f"sampling.refresh_steps must be at least 1, got {refresh_steps}")
        if kl_coef and reference is None:
            raise ValueError("a KL term needs the frozen initial model as reference")
        if len(records) != len(rows):
            raise ValueError(f"{len(records)} training groups for {len(rows)} prompts")
        self.records, self.rows, self.sampling, self.scorer = records, rows, sampling, scorer
        # The trainer's collator: log-ratios are taken over the tokens exactly as they are trained.
        self.collator, self.tokenizer, self.reference = collator, collator.tokenizer, reference
        self.refresh_steps, self.kl_coef, self.seed = refresh_steps, kl_coef, seed
        self.log_dir = Path(log_dir)

    def due(self, step: int) -> bool:
        return step > 0 and step % self.refresh_steps == 0

    def refresh(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """New candidates from `model` for every prompt, re-scored; returns (and logs) their statistics."""
        s = self.sampling
        prompts = [row["prompt"] for row in self.rows]
        sampled: list[list[str]] = []
        # A private RNG stream: the refresh draws the same at every attempt and leaves the training RNG
        # (restored from checkpoints) untouched, so a resumed run equals an unbroken one.
        with eval_mode(model), torch.random.fork_rng(devices=[]):
            for start in range(0, len(prompts), s.batch_size):
                sampled += generate_batch(model, self.tokenizer, prompts[start:start + s.batch_size], s,
                                          seed=self.seed + step + start)
        groups = [with_dataset_responses(responses, row, s.dataset_responses)
                  for responses, row in zip(sampled, self.rows)]
        rewards = score_groups(self.scorer, prompts, groups)
        kls = self._log_ratios(model, prompts, groups) if self.kl_coef else [[0.0] * len(g) for g in groups]
        self.records = [{"query": p, "responses": g, "scores": [r - self.kl_coef * k for r, k in zip(rs, ks)]}
                        for p, g, rs, ks in zip(prompts, groups, rewards, kls)]
        n_sampled = [len(x) for x in sampled]
        sampled_ratios = [k for ks, n in zip(kls, n_sampled) for k in ks[:n]]
        stats = {"step": step, "reward": sample_statistics([rs[:n] for rs, n in zip(rewards, n_sampled)]),
                 "log_ratio_mean": sum(sampled_ratios) / max(len(sampled_ratios), 1)}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Written whole or not at all: a resume reads it.
        write_jsonl(self.log_dir / f"step-{step}.jsonl",
                    ({**record, "rewards": rs, "log_ratios": ks} for record, rs, ks in zip(self.records, rewards, kls)))
        write_json_atomic(self.log_dir / f"step-{step}.json", stats)  # a redone refresh overwrites its own
        tracking.log(stats, prefix="op_refresh")
        log.info("OP-%d refresh at step %d: sampled reward mean %.4f", self.refresh_steps, step,
                 stats["reward"]["mean"])
        return stats

    def _log_ratios(self, model: torch.nn.Module, prompts: list[str], groups: list[list[str]]) -> list[list[float]]:
        """log pi(y|x) - log rho(y|x) of every candidate, summed over its tokens as trained."""
        out = []
        self.reference.to(next(model.parameters()).device)
        with eval_mode(model), torch.no_grad():
            for start in range(0, len(prompts), _LOG_RATIO_BATCH):
                batch = self.collator([{"query": p, "responses": g, "scores": [0.0] * len(g)}
                                       for p, g in zip(prompts[start:start + _LOG_RATIO_BATCH],
                                                       groups[start:start + _LOG_RATIO_BATCH])])
                pi, _ = group_logprob_sums(model, batch["groups"])
                rho, _ = group_logprob_sums(self.reference, batch["groups"])
                for row, (_, responses) in zip((pi - rho).tolist(), batch["groups"]):
                    out.append(row[:len(responses)])
        return out

    def resume_at(self, step: int) -> None:
        """Put back the candidates an unbroken run was training on after optimiser step `step`.

        They are those of the last refresh at or before it, kept in log_dir (written before any later
        step ran); at a refresh step itself the trainer re-samples, as the unbroken run did after saving.
        """
        last = (step // self.refresh_steps) * self.refresh_steps
        if 0 < last < step:
            rows = read_jsonl(self.log_dir / f"step-{last}.jsonl")
            self.records = [{k: row[k] for k in ("query", "responses", "scores")} for row in rows]


class OnlineRRHFTrainer(RRHFTrainer):
    """RRHFTrainer over `OnlineCandidates`: batches carry group indices, collated when their step runs."""

    def __init__(self, *args: Any, candidates: OnlineCandidates, collator: RRHFCollator, **kwargs: Any) -> None:
        if world_size() > 1:
            raise ValueError("sampling=OP-k runs in one process for now (each rank would re-sample every prompt)")
        super().__init__(*args, train_dataset=list(range(len(candidates.records))), data_collator=_indices,
                         **kwargs)
        self.candidates, self.collator = candidates, collator
        self._refreshed_at = -1

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        step = self.state.global_step
        # The first micro-batch after optimiser step k*n re-samples; a run resumed at that step does too.
        if self.candidates.due(step) and self._refreshed_at != step:
            self.candidates.refresh(self.accelerator.unwrap_model(model), step)
            self._refreshed_at = step
        batch = self.collator([self.candidates.records[i] for i in inputs["indices"]])
        return super().training_step(model, batch, num_items_in_batch)


def _indices(indices: list[int]) -> dict[str, list[int]]:
    return {"indices": list(indices)}


def refresh_statistics(log_dir: Path) -> list[dict[str, Any]]:
    """Every refresh's statistics (sampled rewards, mean log-ratio), in step order."""
    files = sorted(Path(log_dir).glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text()) for p in files]
