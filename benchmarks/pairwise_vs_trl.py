"""Speed of our DPO / SimPO / CPO trainer against TRL's on the same pairs, in one run.

Both train the same policy on the same (prompt, chosen, rejected) pairs with the same optimisation (the cpu
profile's: AdamW, lr 2e-5, bf16 autocast over fp32 weights, 4 pairs a step, no gradient checkpointing):

- ours: `rrhf.trainer.PairwiseTrainer`, each prompt run once with both responses packed behind it (the
  shared-prefix layout), DPO's reference log-probs computed once when training begins;
- TRL 1.16: `trl.DPOTrainer` with `precompute_ref_log_probs=True` (reference log-probs computed once too),
  or the CPO trainer (`loss_type="simpo"`, `cpo_alpha=0` for SimPO), one right-padded row per response.

The pairs are the offline data set's chosen and rejected continuations of its first --pairs training prompts.
Each trainer runs in a fresh subprocess (its own peak memory); the two alternate over --reps. Printed: the
median optimiser-step time of each, the whole training's wall time (reference pass included), the peak
resident memory, the TRL / ours ratios, and the command. The policy is the embedded default (SmolLM2-135M)
unless --model says otherwise (e.g. embedded:tiny for a seconds-long check).

    python benchmarks/pairwise_vs_trl.py [--loss dpo|simpo|cpo] [--pairs 32] [--reps 1] [--threads N]
                                         [--model embedded:smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"dpo": {"beta": 0.1}, "simpo": {"beta": 2.5, "gamma": 1.375}, "cpo": {"beta": 0.1, "alpha": 1.0}}
VARIANTS = ("ours", "trl")


def _common(out: str, steps: int) -> dict:
    return {
        "output_dir": out,
        "use_cpu": True,
        "bf16": True,
        "learning_rate": 2e-5,
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "gradient_checkpointing": False,
        "seed": 0,
        "dataloader_num_workers": 0,
    }


def measure(variant: str, loss: str, model_path: str, n_pairs: int, threads: int | None) -> dict:
    """Child process: train `variant` on the pairs; return step times, wall time and peak memory."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from rrhf.assets import default_data_dir, resolve_model
    from rrhf.data import load_split

    path = resolve_model(model_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = load_split(default_data_dir(), "train", limit=n_pairs)
    steps = n_pairs // 4
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        if variant == "ours":
            from rrhf.trainer import PairwiseArguments, PairwiseTrainer

            records = [
                {"query": r["prompt"], "responses": [r["chosen"], r["rejected"]], "scores": [1.0, 0.0]} for r in rows
            ]
            args = PairwiseArguments(
                loss=loss,
                pairs="best_worst",
                layout="shared",
                model_max_length=512,
                **SETTINGS[loss],
                **_common(out, steps),
            )
            trainer = PairwiseTrainer.from_records(
                records,
                args=args,
                output_dir=Path(out),
                model=model,
                processing_class=tokenizer,
                callbacks=[StepTimes()],
            )
        else:
            from datasets import Dataset

            data = Dataset.from_list(
                [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
            )
            if loss == "dpo":
                from trl import DPOConfig, DPOTrainer

                config = DPOConfig(
                    beta=SETTINGS["dpo"]["beta"],
                    loss_type=["sigmoid"],
                    precompute_ref_log_probs=True,
                    max_length=512,
                    **_common(out, steps),
                )
                trainer = DPOTrainer(
                    model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[StepTimes()]
                )
            else:
                from trl.experimental.cpo import CPOConfig, CPOTrainer

                options = (
                    {"loss_type": "simpo", "beta": 2.5, "simpo_gamma": 1.375, "cpo_alpha": 0.0}
                    if loss == "simpo"
                    else {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0}
                )
                trainer = CPOTrainer(
                    model=model,
                    args=CPOConfig(max_length=512, **options, **_common(out, steps)),
                    train_dataset=data,
                    processing_class=tokenizer,
                    callbacks=[StepTimes()],
                )
        trainer.train()
        wall = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "step_seconds": times,
        "wall_seconds": wall,
        "losses": losses,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=tuple(SETTINGS), default="dpo")
    parser.add_argument("--pairs", type=int, default=32, help="training pairs (4 a step)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each measurement")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.loss, args.model, args.pairs, args.threads)))
        return
    env = {
        **os.environ,
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        for variant in VARIANTS:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--loss",
                args.loss,
                "--pairs",
                str(args.pairs),
                "--model",
                args.model,
            ] + (["--threads", str(args.threads)] if args.threads else [])
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.split("RESULT ", 1)[1])
            results[variant].append(result)
            print(
                f"rep {rep + 1} {variant}: median step {statistics.median(result['step_seconds']):.2f} s, "
                f"wall {result['wall_seconds']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB, "
                f"losses {[round(x, 4) for x in result['losses']]}",
                flush=True,
            )
    medians = {
        v: {
            "step": statistics.median(s for r in rs for s in r["step_seconds"]),
            "wall": statistics.median(r["wall_seconds"] for r in rs),
            "rss": statistics.median(r["peak_rss_mib"] for r in rs),
        }
        for v, rs in results.items()
    }
    print(
        f"{args.loss} on {args.pairs} pairs ({args.pairs // 4} steps of 4), model {args.model}, {args.reps} reps, "
        f"torch threads {args.threads or 'default'}"
    )
    for variant, m in medians.items():
        print(
            f"{variant:5s} median step {m['step']:7.2f} s   training wall {m['wall']:7.1f} s   "
            f"peak RSS {m['rss']:7.0f} MiB"
        )
    print(
        f"TRL / ours: step {medians['trl']['step'] / medians['ours']['step']:.2f}, "
        f"wall {medians['trl']['wall'] / medians['ours']['wall']:.2f}, "
        f"peak RSS {medians['trl']['rss'] / medians['ours']['rss']:.2f}"
    )
    print("command: python benchmarks/pairwise_vs_trl.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
