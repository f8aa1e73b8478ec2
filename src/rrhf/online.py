"""OP-k (Table 1): RRHF whose sampled candidates are re-drawn by the current policy every k optimiser steps.

Training starts from the DP candidates of the initial policy (the data set's responses stay in every group).
At optimiser steps k, 2k, ... the policy being trained generates new candidates, with the setting's generator,
for the prompts that the next k optimiser steps train on (as the authors' OP-32 does: fresh candidates for
what comes next, not the whole data set), and every candidate of those groups is re-scored. k counts
optimiser steps of the configured global batch (per-device batch x accumulation x ranks). With a KL
coefficient beta the score becomes R(x, y) - beta * log(pi(y|x) / rho(y|x)) (paper-notes section 4), where
log pi and log rho are the response's summed token log-probs under the current policy and the frozen
initial model (a policy with LoRA adapters: itself with the adapters disabled).

Which prompts a step trains on is fixed in advance by `Schedule` (a seeded permutation per epoch, dealt to
the ranks as accelerate deals batches), so under torchrun every rank re-draws and re-scores the prompts it
will train on itself, and the KL term is computed on the same rank. A batch's candidates are looked up when
its step runs, not when the batch is fetched (the Trainer fetches ahead). Every refresh is kept
(`online/step-<k>.rank<r>-of-<w>.jsonl`); a run resumed from a checkpoint takes the candidates of the last
refresh before it from there, so it trains on exactly what an unbroken run did.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from rrhf import tracking
from rrhf.adapters import has_adapters, initial_policy
from rrhf.collator import RRHFCollator
from rrhf.data import read_jsonl, with_dataset_responses, write_jsonl
from rrhf.generation import eval_mode, generate_batch
from rrhf.launch import rank, world_size
from rrhf.logprobs import group_logprob_sums
from rrhf.reward import score_groups
from rrhf.stats import sample_statistics
from rrhf.trainer import RRHFTrainer

log = logging.getLogger(__name__)

_LOG_RATIO_BATCH = 4  # groups per forward when the KL term's log-ratios are taken


@dataclass(frozen=True)
class Schedule:
    """The prompts each rank trains on at each optimiser step of an OP-k run.

    Epoch e visits the prompts in a permutation seeded by seed + e, padded to a whole number of global
    micro-batches by repeating its start; micro-batch m of rank r is the (m * world + r)-th slice of
    `per_device` prompts (accelerate's round-robin dealing). An optimiser step takes `accumulation`
    micro-batches; the last step of an epoch takes what is left, as the Trainer does.
    """

    num_prompts: int
    per_device: int
    accumulation: int
    seed: int
    world: int = 1
    rank: int = 0

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_prompts / (self.per_device * self.world))

    @property
    def steps_per_epoch(self) -> int:
        return max(math.ceil(self.micro_batches_per_epoch / self.accumulation), 1)

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of `epoch`, in order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_prompts, generator=generator).tolist()
        span = self.per_device * self.world
        padded = self.micro_batches_per_epoch * span
        order = (order * math.ceil(padded / len(order)))[:padded]
        return [
            order[(m * self.world + self.rank) * self.per_device : (m * self.world + self.rank + 1) * self.per_device]
            for m in range(self.micro_batches_per_epoch)
        ]

    def prompts_for_steps(self, first: int, count: int) -> list[int]:
        """The prompts this rank trains on at optimiser steps first .. first + count - 1 (each once, sorted)."""
        prompts: set[int] = set()
        epochs: dict[int, list[list[int]]] = {}  # a refresh of k steps spans one or two epochs
        for step in range(first, first + count):
            epoch, within = divmod(step, self.steps_per_epoch)
            if epoch not in epochs:
                epochs[epoch] = self.micro_batches(epoch)
            for batch in epochs[epoch][within * self.accumulation : (within + 1) * self.accumulation]:
                prompts.update(batch)
        return sorted(prompts)


class _ScheduledBatches:
    """Batch sampler over `Schedule`: this rank's micro-batches of the epoch the Trainer sets."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule, self.epoch = schedule, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.schedule.micro_batches(self.epoch))

    def __len__(self) -> int:
        return self.schedule.micro_batches_per_epoch


class _ScheduledLoader(DataLoader):
    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


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

    def candidates(
        self,
        records: list[dict[str, Any]],
        collator: RRHFCollator,
        model: torch.nn.Module,
        log_dir: Path,
        schedule: Schedule,
    ) -> OnlineCandidates:
        # rho is the model as loaded, before any training step (a resumed run loads checkpoint weights later);
        # an adapted policy is its own rho with its adapters disabled, no copy.
        reference = None
        if self.kl_coef:
            reference = model if has_adapters(model) else copy.deepcopy(model).eval().requires_grad_(False)
        return OnlineCandidates(
            records,
            self.rows,
            self.sampling,
            self.scorer,
            collator,
            refresh_steps=self.refresh_steps,
            kl_coef=self.kl_coef,
            reference=reference,
            seed=self.seed,
            log_dir=log_dir,
            schedule=schedule,
        )


class OnlineCandidates:
    """The training groups of an OP-k run, re-sampled and re-scored in place by `refresh`."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        rows: list[dict[str, Any]],
        sampling: Any,
        scorer: Any,
        collator: RRHFCollator,
        *,
        refresh_steps: int,
        kl_coef: float = 0.0,
        reference: torch.nn.Module | None = None,
        seed: int = 0,
        log_dir: Path,
        schedule: Schedule | None = None,
    ) -> None:
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
        # Without a schedule (one process, every prompt due at every refresh) refreshes cover all prompts.
        self.schedule = schedule

    def due(self, step: int) -> bool:
        return step > 0 and step % self.refresh_steps == 0

    def _log_file(self, step: int) -> Path:
        s = self.schedule
        where = f"rank{s.rank}-of-{s.world}" if s else "rank0-of-1"
        return self.log_dir / f"step-{step}.{where}.jsonl"

    def refresh(self, model: torch.nn.Module, step: int, *, last_step: int | None = None) -> dict[str, Any]:
        """New candidates from `model` for the prompts of the next k steps (none past `last_step`), re-scored;
        returns their statistics."""
        s = self.sampling
        steps = self.refresh_steps if last_step is None else min(self.refresh_steps, last_step - step)
        due = self.schedule.prompts_for_steps(step, steps) if self.schedule else list(range(len(self.rows)))
        prompts = [self.rows[i]["prompt"] for i in due]
        sampled: list[list[str]] = []
        # A private RNG stream: the refresh draws the same at every attempt and leaves the training RNG
        # (restored from checkpoints) untouched, so a resumed run equals an unbroken one. Each batch is seeded
        # by the step and its first prompt, whichever rank draws it.
        with eval_mode(model), torch.random.fork_rng(devices=[]):
            for start in range(0, len(due), s.batch_size):
                sampled += generate_batch(
                    model, self.tokenizer, prompts[start : start + s.batch_size], s, seed=self.seed + step + due[start]
                )
        groups = [
            with_dataset_responses(responses, self.rows[i], s.dataset_responses) for responses, i in zip(sampled, due)
        ]
        rewards = score_groups(self.scorer, prompts, groups)
        kls = self._log_ratios(model, prompts, groups) if self.kl_coef else [[0.0] * len(g) for g in groups]
        kept = []
        for i, prompt, group, rs, ks, n in zip(due, prompts, groups, rewards, kls, map(len, sampled)):
            self.records[i] = {
                "query": prompt,
                "responses": group,
                "scores": [r - self.kl_coef * k for r, k in zip(rs, ks)],
            }
            kept.append({"index": i, **self.records[i], "rewards": rs, "log_ratios": ks, "sampled": n})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(self._log_file(step), kept)  # written whole or not at all: a resume reads it
        stats = _statistics(step, kept)
        tracking.log(stats, prefix="op_refresh")
        log.info(
            "OP-%d refresh at step %d: %d prompts, sampled reward mean %s",
            self.refresh_steps,
            step,
            len(due),
            stats.get("reward", {}).get("mean"),
        )
        return stats

    def _log_ratios(self, model: torch.nn.Module, prompts: list[str], groups: list[list[str]]) -> list[list[float]]:
        """log pi(y|x) - log rho(y|x) of every candidate, summed over its tokens as trained."""
        out = []
        if self.reference is not model:
            self.reference.to(next(model.parameters()).device)
        with eval_mode(model), torch.no_grad():
            for start in range(0, len(prompts), _LOG_RATIO_BATCH):
                batch = self.collator(
                    [
                        {"query": p, "responses": g, "scores": [0.0] * len(g)}
                        for p, g in zip(
                            prompts[start : start + _LOG_RATIO_BATCH], groups[start : start + _LOG_RATIO_BATCH]
                        )
                    ]
                )
                pi, _ = group_logprob_sums(model, batch["groups"])
                with initial_policy(self.reference):
                    rho, _ = group_logprob_sums(self.reference, batch["groups"])
                for row, (_, responses) in zip((pi - rho).tolist(), batch["groups"]):
                    out.append(row[: len(responses)])
        return out

    def resume_at(self, step: int) -> None:
        """Put back the candidates an unbroken run was training on after optimiser step `step`.

        They are those of the last refresh at or before it, kept in log_dir (written before any later step
        ran); at a refresh step itself the trainer re-samples, as the unbroken run did after saving.
        """
        last = (step // self.refresh_steps) * self.refresh_steps
        if 0 < last < step:
            kept = self._log_file(last)
            if not kept.exists():
                raise FileNotFoundError(
                    f"{kept}: the refresh at step {last} that this run resumes from; an OP run "
                    "resumes with the number of ranks it started with"
                )
            for row in read_jsonl(kept):
                self.records[row["index"]] = {k: row[k] for k in ("query", "responses", "scores")}


class OnlineRRHFTrainer(RRHFTrainer):
    """RRHFTrainer over `OnlineCandidates`: batches carry prompt indices from the run's `Schedule`, and are
    collated when their step runs."""

    def __init__(self, *args: Any, candidates: OnlineCandidates, collator: RRHFCollator, **kwargs: Any) -> None:
        super().__init__(*args, train_dataset=list(range(len(candidates.records))), data_collator=_indices, **kwargs)
        from transformers.integrations import is_deepspeed_zero3_enabled

        if self.args.fsdp or is_deepspeed_zero3_enabled():
            # Each rank generates its own prompts, so forward calls differ between ranks: sharded parameters,
            # gathered collectively at every forward, would deadlock.
            raise ValueError(
                "sampling=OP-k needs the whole model on every rank: use trainer=ddp or "
                "trainer=deepspeed_zero2, not fsdp or deepspeed_zero3"
            )
        self.candidates, self.collator = candidates, collator
        self._refreshed_at = -1

    def get_train_dataloader(self) -> DataLoader:
        # The schedule deals the batches to the ranks itself (what accelerate's sharding would do), so that a
        # refresh knows which prompts the coming steps train on.
        return _ScheduledLoader(
            self.train_dataset, batch_sampler=_ScheduledBatches(self.candidates.schedule), collate_fn=_indices
        )

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        step = self.state.global_step
        # The first micro-batch after optimiser step k*n re-samples; a run resumed at that step does too.
        if self.candidates.due(step) and self._refreshed_at != step:
            self.candidates.refresh(self.accelerator.unwrap_model(model), step, last_step=self.state.max_steps)
            self._refreshed_at = step
        batch = self.collator([self.candidates.records[i] for i in inputs["indices"]])
        return super().training_step(model, batch, num_items_in_batch)


def run_schedule(num_prompts: int, args: Any) -> Schedule:
    """The Schedule of a training run with these TrainingArguments, for this process's rank."""
    return Schedule(
        num_prompts,
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.data_seed if args.data_seed is not None else args.seed,
        world=world_size(),
        rank=rank(),
    )


def _indices(indices: list[int]) -> dict[str, list[int]]:
    return {"indices": list(indices)}


def _statistics(step: int, kept: list[dict[str, Any]]) -> dict[str, Any]:
    sampled = [row for row in kept if row["sampled"]]
    ratios = [k for row in sampled for k in row["log_ratios"][: row["sampled"]]]
    stats: dict[str, Any] = {"step": step, "prompts": len(kept), "log_ratio_mean": sum(ratios) / max(len(ratios), 1)}
    if sampled:
        stats["reward"] = sample_statistics([row["rewards"][: row["sampled"]] for row in sampled])
    return stats


def refresh_statistics(log_dir: Path) -> list[dict[str, Any]]:
    """Every refresh's statistics over all ranks (sampled rewards, mean log-ratio, prompts), in step order."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for path in Path(log_dir).glob("step-*.jsonl"):
        by_step.setdefault(int(path.name.split(".")[0].removeprefix("step-")), []).extend(read_jsonl(path))
    return [_statistics(step, rows) for step, rows in sorted(by_step.items())]
