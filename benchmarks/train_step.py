"""One RRHF optimiser step on HH-shaped groups, three ways of computing the responses' log-probs:

- "authors": what the authors' train.py computes (RRHFTrainer.compute_loss, lines 271-276, with
  gather_logits_labels and get_score): one right-padded row per candidate, the logits of every position,
  a log-softmax over the whole vocabulary at every position, a copy of it, then a gather of the labels;
- "concat": this project's `layout=concat`: the same rows, but logits only at the scored positions and the
  normaliser taken there alone (rrhf.logprobs);
- "shared": this project's default `layout=shared`: the prompt once, its candidates packed behind it.

Each measurement runs in a fresh subprocess (so the peak resident memory, or the CUDA peak, belongs to
one variant only), the variants interleaved. A step is forward + backward + AdamW update of `--queries`
groups of k = 6 responses (prompt ~160 tokens, responses 20-120 tokens, random token ids), the same RRHF
loss for all three. Prints median step times, responses per second, peak memory, the speed ratios and the
largest log-prob difference between the variants. On a CPU it also prints the process's CPU seconds per step,
which other work on a shared machine inflates far less than the wall time (most of all with --threads 1).

    python benchmarks/train_step.py [--model PATH] [--device cpu|cuda] [--dtype fp32|bf16] [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from rrhf.logprobs import batch_response_logprobs, group_logprob_sums
from rrhf.loss import rrhf_loss

LAYOUTS = ("concat", "shared")
VARIANTS = ("authors", *LAYOUTS)
IGNORE = -100  # the label of a position that is not scored (the authors' IGNORE_INDEX)


def default_model() -> str:
    root = Path(os.environ.get("RRHF_CACHE", Path.home() / ".cache" / "rrhf")).expanduser()
    return str(root / "models" / "smollm2-135m-instruct")


def make_groups(vocab: int, queries: int, k: int, seed: int) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(queries):
        prompt = torch.randint(3, vocab, (int(torch.randint(150, 171, (1,), generator=gen)),), generator=gen)
        lengths = torch.randint(20, 121, (k,), generator=gen).tolist()
        groups.append((prompt, [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]))
    return groups


def autocast(args: argparse.Namespace):
    # bf16 here means fp32 weights with bf16 autocast, the way the trainer profiles run.
    if args.dtype == "bf16":
        return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    groups = make_groups(model.config.vocab_size, args.queries, args.k, args.seed)
    return model, [(p.to(args.device), [r.to(args.device) for r in rs]) for p, rs in groups]


def authors_token_logprobs(model, groups) -> list[list[torch.Tensor]]:
    """Per-token log-probs of every response as the authors' train.py computes them (our own code after its
    lines 234-246 and 271-276): rows query + response, right-padded, labels shifted by one with the query's
    positions ignored; the model returns the logits of every position, which go through a full-vocabulary
    log-softmax, are copied, and the label of each position is gathered."""
    rows, labels = [], []
    for prompt, responses in groups:
        for response in responses:
            rows.append(torch.cat([prompt, response]))
            ignored = prompt.new_full((prompt.numel() - 1,), IGNORE)
            labels.append(torch.cat([ignored, response, prompt.new_full((1,), IGNORE)]))
    lengths = torch.tensor([r.numel() for r in rows], device=rows[0].device)
    input_ids = pad_sequence(rows, batch_first=True, padding_value=0)
    attention_mask = (torch.arange(input_ids.shape[1], device=lengths.device)[None] < lengths[:, None]).long()
    labels = pad_sequence(labels, batch_first=True, padding_value=IGNORE)[:, : input_ids.shape[1]]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (rows, positions, vocab)
    logits = F.log_softmax(logits, dim=-1).clone()
    scored = labels != IGNORE
    picked = torch.gather(logits, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
    out, row = [], 0
    for _, responses in groups:
        out.append([picked[row + i][scored[row + i]].float() for i in range(len(responses))])
        row += len(responses)
    return out


def logprob_sums(model, groups, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and lengths of each group's responses, (B, k), by one of the VARIANTS."""
    if variant in LAYOUTS:
        return group_logprob_sums(model, groups, layout=variant)
    per_token = authors_token_logprobs(model, groups)
    sums = torch.stack([torch.stack([t.sum() for t in group]) for group in per_token])
    lengths = torch.tensor([[t.numel() for t in group] for group in per_token], device=sums.device)
    return sums, lengths


def token_logprobs(model, groups, variant: str) -> list[list[torch.Tensor]]:
    if variant in LAYOUTS:
        return batch_response_logprobs(model, groups, layout=variant)
    return authors_token_logprobs(model, groups)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def worker_step(args: argparse.Namespace) -> dict:
    """Time `--steps` optimiser steps of one variant (after one warm-up step) and report the peak memory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, groups = load(args)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    rewards = torch.randn(len(groups), args.k, generator=torch.Generator().manual_seed(1)).to(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for step in range(args.steps + 1):
        sync(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast(args):
            sums, lengths = logprob_sums(model, groups, args.worker)
        loss = rrhf_loss(sums, lengths, rewards).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        if step > 0:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if args.device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"times": times, "cpu_times": cpu_times, "peak_mib": peak_mib}


def worker_compare(args: argparse.Namespace) -> dict:
    """Largest absolute per-token log-prob differences: of each variant against the authors' computation (fp32
    and the chosen dtype), and of each variant in the chosen dtype against fp32 authors (the size of plain
    rounding noise)."""
    model, groups = load(args)
    model.eval()
    runs = {}
    for name, ctx in (("fp32", contextlib.nullcontext), (args.dtype, lambda: autocast(args))):
        for variant in VARIANTS:
            with torch.no_grad(), ctx():
                runs[name, variant] = [t for g in token_logprobs(model, groups, variant) for t in g]

    def diff(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(runs[a], runs[b]))

    out = {
        f"{name} {variant} vs authors": diff((name, variant), (name, "authors"))
        for name in dict.fromkeys(("fp32", args.dtype))
        for variant in LAYOUTS
    }
    if args.dtype != "fp32":
        for variant in VARIANTS:
            out[f"{args.dtype} {variant} vs fp32 authors"] = diff((args.dtype, variant), ("fp32", "authors"))
    return out


def run_worker(mode: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--queries",
        str(args.queries),
        "--k",
        str(args.k),
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--queries", type=int, default=1, help="groups per step (the paper: 1 per device)")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per variant, interleaved")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process, after one warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--worker", choices=(*VARIANTS, "compare"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "compare":
        print(json.dumps(worker_compare(args)))
        return
    if args.worker:
        print(json.dumps(worker_step(args)))
        return

    print("command:", shlex.join([sys.executable, *sys.argv]))
    threads = args.threads or torch.get_num_threads()
    print(
        f"torch {torch.__version__}, threads {threads}, device {args.device}, dtype {args.dtype}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    groups = make_groups(49152, args.queries, args.k, args.seed)
    n_prompt = [p.numel() for p, _ in groups]
    n_resp = [r.numel() for _, rs in groups for r in rs]
    print(f"{args.queries} group(s) x k={args.k}: prompt tokens {n_prompt}, response tokens {n_resp}")
    results: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for rep in range(args.reps):
        for variant in VARIANTS:
            res = run_worker(variant, args)
            results[variant].append(res)
            print(
                f"  rep {rep} {variant:7s}: steps {', '.join(f'{t:.2f}' for t in res['times'])} s "
                f"(CPU {', '.join(f'{t:.2f}' for t in res['cpu_times'])} s), peak {res['peak_mib']:.0f} MiB",
                flush=True,
            )
    medians, cpu_medians = {}, {}
    responses = args.queries * args.k
    mem_kind = "CUDA max allocated" if args.device == "cuda" else "max RSS"
    for variant in VARIANTS:
        times = [t for res in results[variant] for t in res["times"]]
        peaks = [res["peak_mib"] for res in results[variant]]
        medians[variant] = statistics.median(times)
        cpu_medians[variant] = statistics.median(t for res in results[variant] for t in res["cpu_times"])
        print(
            f"{variant:7s}: median step {medians[variant]:.3f} s (CPU {cpu_medians[variant]:.3f} s) over "
            f"{len(times)} steps, "
            f"{responses / medians[variant]:.2f} responses/s, peak {mem_kind} median "
            f"{statistics.median(peaks):.0f} MiB (max {max(peaks):.0f})"
        )
    for fast, slow in (("shared", "authors"), ("concat", "authors"), ("shared", "concat")):
        print(
            f"speed-up {fast} vs {slow}: {medians[slow] / medians[fast]:.2f}x wall time, "
            f"{cpu_medians[slow] / cpu_medians[fast]:.2f}x CPU time"
        )
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    diff = run_worker("compare", args)
    print("max |per-token log-prob difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))


if __name__ == "__main__":
    main()
