"""Running a training: the Trainer class a method needs, resuming from the last checkpoint, the saved model.

`train` is what the pipeline's train stage calls, for RRHF (`rrhf.trainer.RRHFTrainer`), for OP-k
(`rrhf.online.OnlineRRHFTrainer`, candidates re-drawn as it trains), for DPO, SimPO and CPO
(`rrhf.trainer.PairwiseTrainer`, on pairs of the same candidates) and for supervised fine-tuning on
prompt + response (`objective="lm"`: the stock Trainer's next-token loss, as trlX's sft_hh). Any of them
trains LoRA or QLoRA adapters instead of every weight when given `adapters` (`rrhf.adapters`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from rrhf import tracking
from rrhf.adapters import AdapterSettings, checkpointing_kwargs, load_adapted_policy, merge_adapter
from rrhf.assets import add_pad_token, load_tokenizer
from rrhf.collator import LMCollator, RRHFCollator
from rrhf.data import read_training_file, strict_json
from rrhf.online import OnlineRRHFTrainer, OnlineSettings, run_schedule
from rrhf.trainer import PairwiseArguments, PairwiseTrainer, RRHFArguments, RRHFTrainer


def last_checkpoint(folder: str | Path) -> str | None:
    """The newest complete checkpoint under `folder` (its trainer_state.json is written last), or None."""
    done = [
        p
        for p in Path(folder).glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()
    ]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def train(
    model_path: str | Path,
    train_file: str | Path,
    output_dir: str | Path,
    *,
    args: RRHFArguments | PairwiseArguments,
    callbacks: list[TrainerCallback] | None = None,
    online: OnlineSettings | None = None,
    trust_remote_code: bool = False,
    adapters: AdapterSettings | None = None,
) -> Path:
    """Fine-tune the causal LM at `model_path` with RRHF on `train_file`; return the saved model folder.

    Checkpoints go to args.output_dir (the pipeline uses output_dir/"checkpoints") and training resumes from
    the newest complete one found there. Writes output_dir/"model" (weights as safetensors + tokenizer) and
    output_dir/"log_history.json". With `online` (OP-k) the file's groups are the starting candidates,
    re-sampled every k steps (see `rrhf.online`); every refresh is kept in output_dir/"online".
    `trust_remote_code` is the run's `model.trust_remote_code`: a model whose code comes with its weights.
    With `adapters` (LoRA / QLoRA) only the adapters train; the adapter is saved to output_dir/"adapter" and
    output_dir/"model" holds it merged into the base, so the model folder loads as after full training.
    """
    from transformers import AutoModelForCausalLM

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(model_path), trust_remote_code=trust_remote_code)
    # The process group exists before the weights load: ZeRO-3 partitions them while loading, across the ranks.
    _ = args.device
    if args.deepspeed and torch.distributed.is_initialized():
        import deepspeed

        # On CPU ranks accelerate sets up the torch group without DeepSpeed's handle to it; give it one.
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    if args.gradient_checkpointing and not args.gradient_checkpointing_kwargs:
        _set_checkpointing_kwargs(args)
    if adapters is None:
        # fp32 weights: bf16 profiles autocast (CPU) or keep fp32 masters (FSDP, DeepSpeed); pure bf16 weights
        # lose small updates.
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        if args.add_pad_token:
            add_pad_token(model, tokenizer)
    else:
        # A LoRA base is frozen: on a GPU training in bf16 it is stored in bf16 (memory; it gets no updates, so
        # bf16 storage loses nothing training would keep), the adapters in fp32, as peft / TRL / QLoRA do
        # (rrhf.adapters.base_dtype). On a CPU it stays fp32. model/ is merged into a base reloaded in fp32.
        model = load_adapted_policy(
            model_path,
            adapters,
            device=args.device,
            bf16=bool(args.bf16),
            tokenizer=tokenizer,
            authors_pad=args.add_pad_token,
            gradient_checkpointing=bool(args.gradient_checkpointing),
            trust_remote_code=trust_remote_code,
            seed=args.seed,
        )
    records = read_training_file(train_file)
    collator = RRHFCollator(
        tokenizer,
        semantics=args.semantics,
        model_max_length=args.model_max_length,
        max_prompt_tokens=args.max_prompt_tokens,
        max_response_tokens=args.max_response_tokens,
    )
    resume = last_checkpoint(args.output_dir)
    language_model = isinstance(args, RRHFArguments) and args.objective == "lm"
    if (language_model or isinstance(args, PairwiseArguments)) and online is not None:
        raise ValueError("online sampling (OP-k, sampling.refresh_steps) is RRHF's; this method trains on fixed data")
    with tracking.trainer_run(args.report_to, output_dir):
        if isinstance(args, PairwiseArguments):  # DPO, SimPO, CPO on pairs of the file's groups
            trainer = PairwiseTrainer.from_records(
                records, args=args, output_dir=output_dir, model=model, processing_class=tokenizer, callbacks=callbacks
            )
        elif language_model:
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=records,
                data_collator=LMCollator(tokenizer, max_length=args.model_max_length),
                processing_class=tokenizer,
                callbacks=callbacks,
            )
        elif online is None:
            trainer = RRHFTrainer(
                model=model,
                args=args,
                train_dataset=records,
                data_collator=collator,
                processing_class=tokenizer,
                callbacks=callbacks,
            )
        else:
            candidates = online.candidates(
                records, collator, model, output_dir / "online", run_schedule(len(records), args)
            )
            if resume is not None:
                candidates.resume_at(int(Path(resume).name.split("-")[-1]))
            trainer = OnlineRRHFTrainer(
                model=model,
                args=args,
                candidates=candidates,
                collator=collator,
                processing_class=tokenizer,
                callbacks=callbacks,
            )
        trainer.train(resume_from_checkpoint=resume)
    final = output_dir / "model"
    # A PeftModel's save_model writes the adapter (and tokenizer) only; the merge below reloads the base.
    trainer.save_model(str(final if adapters is None else output_dir / "adapter"))
    if trainer.is_world_process_zero():
        log = output_dir / "log_history.json"
        log.write_text(strict_json(trainer.state.log_history, log, indent=1))  # a diverged run is refused here
    if args.deepspeed:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # Otherwise every later from_pretrained of this process (the evaluation's, the merge's) would load
        # ZeRO-3-partitioned.
        unset_hf_deepspeed_config()
    if adapters is not None and trainer.is_world_process_zero():
        merge_adapter(output_dir / "adapter", final, trust_remote_code=trust_remote_code)
    return final


def _set_checkpointing_kwargs(args: RRHFArguments | PairwiseArguments) -> None:
    # transformers 5 reads activation_checkpointing_kwargs, of which gradient_checkpointing_kwargs is the
    # deprecated alias resolved at construction; set both, so that either version's Trainer takes it.
    for name in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):
        if hasattr(args, name):
            setattr(args, name, checkpointing_kwargs())
