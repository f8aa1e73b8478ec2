"""RRHF on the Hugging Face Trainer: the arguments and the Trainer subclass, which overrides only the loss.

The Trainer keeps everything else: optimiser, schedule, mixed precision, DDP / FSDP / DeepSpeed, checkpoints
and exact resume. A device batch holds any number of queries with all their candidates. Running a training
(the choice of Trainer class, checkpoints to resume from, logging) is `rrhf.training.train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from rrhf import PROJECT_ROOT
from rrhf.logprobs import LAYOUTS, group_logprob_sums
from rrhf.loss import SEMANTICS, rrhf_loss

OBJECTIVES = ("rrhf", "lm")


@dataclass
class RRHFArguments(TrainingArguments):
    """TrainingArguments plus the RRHF options.

    The paper's optimisation settings (lr 2e-5, 3 epochs, 3% warmup, cosine, no weight decay, 64 queries a
    step, ...) are the run's configuration, not Python defaults: `conf/trainer/base.yaml`, each with its
    source, and the profiles that extend it. Here are the options the loss adds, defaulting to the paper.
    """

    objective: str = field(default="rrhf", metadata={"help": "'rrhf', or 'lm': next-token loss over prompt + "
                                                                  "response (trlX sft_hh)"})
    semantics: str = field(default="paper", metadata={"help": "'paper' (Eqs. 1-4) or 'official' (authors' code)"})
    rank_weight: float = field(default=1.0, metadata={"help": "weight of the ranking term (authors' rrhf_weight)"})
    length_penalty: float = field(default=1.0, metadata={"help": "exponent of the length normalisation"})
    model_max_length: int = field(default=192, metadata={"help": "official: query + response token budget (192 for "
                                                                 "HH); lm: tokens kept from the end of each text"})
    max_prompt_tokens: int = field(default=256, metadata={"help": "paper: query tokens kept (sampling's limit)"})
    max_response_tokens: int = field(default=128, metadata={"help": "paper: response tokens kept, before the EOS"})
    add_pad_token: bool = field(default=False, metadata={"help": "add the authors' [PAD] token when there is none"})
    layout: str = field(default="shared", metadata={"help": "'shared' (prompt once) or 'concat' (authors')"})
    # The batch is {groups, reward_ranks, valid, pad_lengths}, not model inputs: nothing to drop.
    remove_unused_columns: bool = False

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
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


class RRHFTrainer(Trainer):
    """Trainer whose loss is RRHF's; logs the ranking and SFT terms next to the loss."""

    # compute_loss returns a mean over this batch's queries: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parts: torch.Tensor | None = None  # running [sum of rank, sum of sft, queries] since the last log

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """RRHF loss of a batch from `RRHFCollator`: mean over its queries of rank_weight * rank + sft."""
        args = self.args
        sums, lengths = group_logprob_sums(model, inputs["groups"], layout=args.layout)
        out = rrhf_loss(sums, lengths, inputs["reward_ranks"], semantics=args.semantics,
                        rank_weight=args.rank_weight, length_penalty=args.length_penalty,
                        pad_lengths=inputs["pad_lengths"], valid=inputs["valid"])
        if model.training:
            parts = torch.stack([out.rank.detach().sum(), out.sft.detach().sum(),
                                 torch.tensor(float(out.rank.numel()), device=out.rank.device)])
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
