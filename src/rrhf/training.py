"""Running a training: the Trainer class a method needs, resuming from the last checkpoint, the saved model.

`train` is what the pipeline's train stage calls, for RRHF (`rrhf.trainer.RRHFTrainer`) and for OP-k
(`rrhf.online.OnlineRRHFTrainer`, candidates re-drawn as it trains).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from rrhf import tracking
from rrhf.collator import RRHFCollator
from rrhf.data import read_training_file
from rrhf.online import OnlineRRHFTrainer, OnlineSettings
from rrhf.trainer import RRHFArguments, RRHFTrainer


def last_checkpoint(folder: str | Path) -> str | None:
    """The newest complete checkpoint under `folder` (its trainer_state.json is written last), or None."""
    done = [p for p in Path(folder).glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


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
    with tracking.trainer_run(args.report_to, output_dir):
        if online is None:
            trainer = RRHFTrainer(model=model, args=args, train_dataset=records, data_collator=collator,
                                  processing_class=tokenizer, callbacks=callbacks)
        else:
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
