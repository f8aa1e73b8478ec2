"""RRHF fine-tuning on the Hugging Face Trainer: arguments, the Trainer subclass and `train`, the pipeline entry.

The Trainer keeps everything but the loss: optimiser, schedule, mixed precision, FSDP / DeepSpeed,
checkpoints and exact resume. A device batch holds any number of queries with all their candidates.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from rrhf.collator import RRHFCollator, read_training_file
from rrhf.logprobs import LAYOUTS, group_logprob_sums
from rrhf.loss import SEMANTICS, rrhf_loss

if TYPE_CHECKING:
    from rrhf.online import OnlineSettings

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RRHFArguments(TrainingArguments):
    """TrainingArguments plus the RRHF options, with the paper's training defaults.

    Sources of the defaults: the paper (Yuan et al., arXiv 2304.05302) and the authors' released training
    scripts (GitHub GanjinZero/RRHF): 3 epochs, lr 2e-5, warmup 3%, cosine schedule (the scripts; the
    paper's text says linear), no weight decay, AdamW, 1 query per device with 8 accumulation steps (x 8
    GPUs = 64 queries per optimiser step), model_max_length 192 for HH, rrhf_weight 1.
    """

    semantics: str = field(default="paper", metadata={"help": "'paper' (Eqs. 1-4) or 'official' (authors' code)"})
    rank_weight: float = field(default=1.0, metadata={"help": "weight of the ranking term (authors' rrhf_weight)"})
    length_penalty: float = field(default=1.0, metadata={"help": "exponent of the length normalisation"})
    model_max_length: int = field(default=192, metadata={"help": "query + response token budget (192 for HH)"})
    layout: str = field(default="shared", metadata={"help": "'shared' (prompt once) or 'concat' (authors')"})

    learning_rate: float = 2e-5
    num_train_epochs: float = 3.0
    # transformers 5 folded warmup_ratio into warmup_steps: a float below 1 is a ratio of the total steps.
    warmup_steps: float = 0.03
    # The authors' scripts use cosine; the paper's text says linear decay to 0.
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    per_device_train_batch_size: int = 1  # queries (each with all its candidates)
    gradient_accumulation_steps: int = 8
    # wandb logs offline here: `train` sets WANDB_MODE=offline unless the environment says otherwise.
    report_to: str | list[str] | None = "wandb"
    # Harness choices, not the authors': log every step; keep optimizer/scheduler/RNG state in
    # checkpoints so a resumed run is exact; keep two checkpoints so one is complete if a save is killed.
    logging_steps: float = 1
    save_strategy: str = "steps"
    save_steps: float = 200
    save_total_limit: int | None = 2
    save_only_model: bool = False
    # The batch is {groups, reward_ranks, valid, pad_lengths}, not model inputs: nothing to drop.
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


def last_checkpoint(folder: str | Path) -> str | None:
    """The newest complete checkpoint under `folder` (its trainer_state.json is written last), or None."""
    done = [p for p in Path(folder).glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


@contextlib.contextmanager
def _wandb_env(args: RRHFArguments, output_dir: Path) -> Iterator[None]:
    # Offline unless told otherwise (no key, no network), and its files inside this run's folder.
    if "wandb" not in (args.report_to or []):
        yield
        return
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR")}
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(output_dir))
    try:
        yield
    finally:
        import wandb

        # Close the run and its log files: the next run of a sweep in this process starts its own, and
        # this run's folder is renamed once the stage completes.
        if wandb.run is not None:
            wandb.finish()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train(model_path: str | Path, train_file: str | Path, output_dir: str | Path, *, args: RRHFArguments,
          callbacks: list[TrainerCallback] | None = None, online: OnlineSettings | None = None) -> Path:
    """Fine-tune the causal LM at `model_path` with RRHF on `train_file`; return the saved model folder.

    Checkpoints go to args.output_dir (the pipeline uses output_dir/"checkpoints") and training resumes from
    the newest complete one found there. Writes output_dir/"model" (weights as safetensors + tokenizer) and
    output_dir/"log_history.json". With `online` (OP-k) the file's groups are the starting candidates,
    re-sampled every k steps (see `rrhf.online`); every refresh is kept in output_dir/"online".
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # fp32 weights: bf16 profiles autocast (CPU) or keep fp32 masters (FSDP, DeepSpeed); pure bf16 weights
    # lose small updates.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    records = read_training_file(train_file)
    collator = RRHFCollator(tokenizer, semantics=args.semantics, model_max_length=args.model_max_length)
    resume = last_checkpoint(args.output_dir)
    with _wandb_env(args, output_dir):
        if online is None:
            trainer = RRHFTrainer(model=model, args=args, train_dataset=records, data_collator=collator,
                                  processing_class=tokenizer, callbacks=callbacks)
        else:
            from rrhf.online import OnlineRRHFTrainer

            candidates = online.candidates(records, collator, model, output_dir / "online")
            if resume is not None:
                candidates.resume_at(int(Path(resume).name.split("-")[-1]))
            trainer = OnlineRRHFTrainer(model=model, args=args, candidates=candidates, collator=collator,
                                        processing_class=tokenizer, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
    final = output_dir / "model"
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return final
