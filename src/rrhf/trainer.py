"""RRHF, DPO, SimPO and CPO on the Hugging Face Trainer: arguments and Trainer subclasses overriding the loss.

The Trainer keeps everything else: optimiser, schedule, mixed precision, DDP / FSDP / DeepSpeed, checkpoints
and exact resume. A device batch holds any number of queries with all their candidates (RRHF) or with the
responses their pairs use (DPO, SimPO, CPO: `rrhf.pairwise`). Running a training (the choice of Trainer class,
checkpoints to resume from, logging) is `rrhf.training.train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from rrhf import PROJECT_ROOT
from rrhf.adapters import has_adapters, initial_policy
from rrhf.artifacts import write_json_atomic
from rrhf.data import read_jsonl, write_jsonl
from rrhf.logprobs import LAYOUTS, group_logprob_sums
from rrhf.loss import SEMANTICS, rrhf_loss
from rrhf.pairwise import LOSSES, PAIRS, USES_REFERENCE, PairwiseCollator, pair_examples, pairwise_loss, reference_sums

OBJECTIVES = ("rrhf", "lm")


@dataclass
class CandidateArguments(TrainingArguments):
    """TrainingArguments plus how the candidates of a training file become tokens, for every method that trains
    on them (RRHF; DPO, SimPO and CPO).

    The paper's optimisation settings (lr 2e-5, 3 epochs, 3% warmup, cosine, no weight decay, 64 queries a
    step, ...) are the run's configuration, not Python defaults: `conf/trainer/base.yaml`, each with its
    source, and the profiles that extend it.
    """

    semantics: str = field(default="paper", metadata={"help": "'paper' (Eqs. 1-4) or 'official' (authors' code)"})
    model_max_length: int = field(
        default=192,
        metadata={
            "help": "official: query + response token budget (192 for HH); lm: tokens kept from the end of each text"
        },
    )
    max_prompt_tokens: int = field(default=256, metadata={"help": "paper: query tokens kept (sampling's limit)"})
    max_response_tokens: int = field(default=128, metadata={"help": "paper: response tokens kept, before the EOS"})
    add_pad_token: bool = field(default=False, metadata={"help": "add the authors' [PAD] token when there is none"})
    layout: str = field(default="shared", metadata={"help": "'shared' (prompt once) or 'concat' (authors')"})
    # Batches are groups of candidates, not model inputs: nothing to drop.
    remove_unused_columns: bool = False

    def __post_init__(self) -> None:
        if self.semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {self.semantics!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.model_max_length < 2:
            raise ValueError(f"model_max_length must be at least 2, got {self.model_max_length}")
        # Profiles name their DeepSpeed file relative to the project root; resolve it from anywhere.
        if isinstance(self.deepspeed, str) and not Path(self.deepspeed).exists():
            candidate = PROJECT_ROOT / self.deepspeed
            if candidate.exists():
                self.deepspeed = str(candidate)
        super().__post_init__()


@dataclass
class RRHFArguments(CandidateArguments):
    """The RRHF options (paper Eqs. 1-4), defaulting to the paper."""

    objective: str = field(
        default="rrhf", metadata={"help": "'rrhf', or 'lm': next-token loss over prompt + response (trlX sft_hh)"}
    )
    rank_weight: float = field(default=1.0, metadata={"help": "weight of the ranking term (authors' rrhf_weight)"})
    length_penalty: float = field(default=1.0, metadata={"help": "exponent of the length normalisation"})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        super().__post_init__()


class RRHFTrainer(Trainer):
    """Trainer whose loss is RRHF's; logs the ranking and SFT terms next to the loss."""

    # compute_loss returns a mean over this batch's queries: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parts: torch.Tensor | None = None  # running [sum of rank, sum of sft, queries] since the last log

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """RRHF loss of a batch from `RRHFCollator`: mean over its queries of rank_weight * rank + sft."""
        args = self.args
        sums, lengths = group_logprob_sums(model, inputs["groups"], layout=args.layout)
        out = rrhf_loss(
            sums,
            lengths,
            inputs["reward_ranks"],
            semantics=args.semantics,
            rank_weight=args.rank_weight,
            length_penalty=args.length_penalty,
            pad_lengths=inputs["pad_lengths"],
            valid=inputs["valid"],
        )
        if model.training:
            parts = torch.stack(
                [
                    out.rank.detach().sum(),
                    out.sft.detach().sum(),
                    torch.tensor(float(out.rank.numel()), device=out.rank.device),
                ]
            )
            self._parts = parts if self._parts is None else self._parts + parts
        if return_outputs:
            return out.loss, {"rank": out.rank, "sft": out.sft, "logp_sums": sums, "lengths": lengths}
        return out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add `rank_loss` and `sft_loss`, per-query means over the logging interval, to training logs."""
        if "loss" in logs and self._parts is not None:
            # Every process logs the training loss at the same steps, so this reduction is collective-safe.
            parts = self.accelerator.reduce(self._parts.float(), reduction="sum")
            rank, sft, count = parts.tolist()
            logs["rank_loss"] = round(rank / count, 6)
            logs["sft_loss"] = round(sft / count, 6)
            self._parts = None
        super().log(logs, start_time)


@dataclass
class PairwiseArguments(CandidateArguments):
    """TrainingArguments plus the options of DPO, SimPO and CPO (`rrhf.pairwise`).

    Each method's own values (beta, SimPO's gamma, CPO's alpha) come from its config, conf/method/<loss>.yaml,
    with their sources; here they have no default, so a missing one is an error rather than a silent value.
    The optimisation settings are the trainer profile's, as for RRHF.
    """

    loss: str = field(default="dpo", metadata={"help": f"one of {LOSSES}"})
    pairs: str = field(default="best_worst", metadata={"help": f"how a group gives pairs: one of {PAIRS}"})
    beta: float | None = field(default=None, metadata={"help": "scale of the margin inside the sigmoid"})
    gamma: float | None = field(default=None, metadata={"help": "SimPO's target margin"})
    alpha: float | None = field(default=None, metadata={"help": "CPO's weight of the NLL of the preferred response"})
    dataset_responses: list[str] = field(
        default_factory=list,
        metadata={"help": "the data set's responses at the end of each group, in order (sampling.dataset_responses)"},
    )

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.pairs not in PAIRS:
            raise ValueError(f"method.pairs must be one of {PAIRS}, got {self.pairs!r}")
        needed = ["beta"] + ["gamma"] * (self.loss == "simpo") + ["alpha"] * (self.loss == "cpo")
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"method={self.loss} needs method.train_args.{missing[0]} (conf/method/{self.loss}.yaml sets it)"
            )
        super().__post_init__()


class PairwiseTrainer(Trainer):
    """Trainer whose loss is DPO's, SimPO's or CPO's; logs the preference and NLL terms, margin and accuracy.

    DPO's reference log-probs are those of the initial policy: computed once when training begins, before
    the first step, with the prepared model (so under the same mixed precision as the training forward), and
    cached in `reference_cache`, so a resumed run takes the reference of the first attempt. A policy with
    LoRA adapters is its own reference with the adapters disabled (`rrhf.adapters.initial_policy`).
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a mean over the batch's pairs

    def __init__(self, *args: Any, reference_cache: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference_cache = Path(reference_cache) if reference_cache else None
        self._parts: torch.Tensor | None = None  # running [preference, nll, margin, correct, pairs, batches]
        if USES_REFERENCE[self.args.loss]:
            self.add_callback(_ReferencePass(self))

    @classmethod
    def from_records(
        cls, records: list[dict[str, Any]], *, args: PairwiseArguments, output_dir: Path, **kwargs: Any
    ) -> PairwiseTrainer:
        """A trainer on the pairs of {query, responses, scores} records; writes output_dir/pairs.json."""
        examples, stats = pair_examples(records, args.pairs, dataset_responses=args.dataset_responses)
        if not examples:
            raise ValueError(
                f"method.pairs={args.pairs}: no group of the training file gives a pair "
                f"({stats['skipped_ties']} groups whose rewards all tie)"
            )
        write_json_atomic(Path(output_dir) / "pairs.json", stats)
        collator = PairwiseCollator(
            kwargs["processing_class"],
            semantics=args.semantics,
            model_max_length=args.model_max_length,
            max_prompt_tokens=args.max_prompt_tokens,
            max_response_tokens=args.max_response_tokens,
        )
        return cls(
            args=args,
            train_dataset=examples,
            data_collator=collator,
            reference_cache=Path(output_dir) / "reference_logprobs.jsonl",
            **kwargs,
        )

    def attach_reference(self, model: torch.nn.Module) -> None:
        """Give every training example its reference log-prob sums: from the cache, else computed with `model`."""
        examples = self.train_dataset
        if self.reference_cache is not None and self.reference_cache.exists():
            sums = read_jsonl(self.reference_cache)
            if len(sums) != len(examples) or any(len(s) != len(e["responses"]) for s, e in zip(sums, examples)):
                raise ValueError(
                    f"{self.reference_cache}: cached reference log-probs do not match the training "
                    "examples; remove the file to recompute them"
                )
        else:
            was_training = model.training
            model.eval()
            with initial_policy(model):
                sums = reference_sums(
                    model,
                    self.data_collator,
                    examples,
                    batch_size=self.args.per_device_train_batch_size,
                    layout=self.args.layout,
                )
            model.train(was_training)
            if self.reference_cache is not None and self.is_world_process_zero():
                write_jsonl(self.reference_cache, sums)
        for example, values in zip(examples, sums):
            example["reference"] = values

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """The method's loss over the batch's pairs (a mean over pairs, plus CPO's NLL term)."""
        args = self.args
        sums, lengths = group_logprob_sums(model, inputs["groups"], layout=args.layout)
        g, c, r = inputs["pairs"].to(sums.device).unbind(1)
        ref_c = ref_r = None
        if USES_REFERENCE[args.loss]:
            if inputs.get("reference") is None:
                raise RuntimeError("DPO batch without reference log-probs: attach_reference() did not run")
            width = sums.shape[1]
            ref = torch.tensor(
                [row + [0.0] * (width - len(row)) for row in inputs["reference"]],
                dtype=torch.float64,
                device=sums.device,
            )
            ref_c, ref_r = ref[g, c], ref[g, r]
        out = pairwise_loss(
            args.loss,
            sums[g, c],
            sums[g, r],
            lengths[g, c],
            lengths[g, r],
            beta=args.beta,
            gamma=args.gamma or 0.0,
            alpha=args.alpha or 0.0,
            ref_chosen=ref_c,
            ref_rejected=ref_r,
        )
        if model.training:
            parts = torch.stack(
                [
                    out.preference.detach().sum(),
                    out.nll.detach(),
                    out.margin.detach().sum(),
                    (out.margin.detach() > 0).sum().to(out.nll),
                    out.nll.new_tensor(float(len(g))),
                    out.nll.new_tensor(1.0),
                ]
            ).float()
            self._parts = parts if self._parts is None else self._parts + parts
        if return_outputs:
            return out.loss, {"preference": out.preference, "nll": out.nll, "margin": out.margin}
        return out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the per-pair preference loss, NLL (per batch), margin and accuracy since the last log."""
        if "loss" in logs and self._parts is not None:
            parts = self.accelerator.reduce(self._parts, reduction="sum")
            preference, nll, margin, correct, pairs, batches = parts.tolist()
            logs |= {
                "preference_loss": round(preference / pairs, 6),
                "nll_loss": round(nll / batches, 6),
                "reward_margin": round(margin / pairs, 6),
                "reward_accuracy": round(correct / pairs, 6),
            }
            self._parts = None
        super().log(logs, start_time)


class _ReferencePass(TrainerCallback):
    """Runs `attach_reference` with the prepared model when training begins (after any wrapping, before step 1)."""

    def __init__(self, trainer: PairwiseTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        cache = self.trainer.reference_cache
        fixed_base = has_adapters(self.trainer.model)  # adapters off, it is the initial policy at any step
        if state.global_step > 0 and (cache is None or not cache.exists()) and not fixed_base:
            # The model holds a checkpoint's weights now, not the initial policy's.
            raise RuntimeError(
                f"resuming DPO at step {state.global_step} without its cached reference log-probs "
                f"({cache}): start the stage again from an empty folder"
            )
        self.trainer.attach_reference(self.trainer.model_wrapped)
