"""One RRHF optimiser step on HH-shaped groups: the authors' concat layout vs the shared-prompt layout.

Each measurement runs in a fresh subprocess (so the peak resident memory, or the CUDA peak, belongs to
one layout only), alternating concat / shared. A step is forward + backward + AdamW update of
`--queries` groups of k = 6 responses (prompt ~160 tokens, responses 20-120 tokens, random token ids).
Prints median step times, responses per second, peak memory, the speed ratio and the largest log-prob
difference between the layouts.

    python benchmarks/train_step.py [--model PATH] [--device cpu|cuda] [--dtype fp32|bf16] [--reps 3]
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

from rrhf.logprobs import batch_response_logprobs, group_logprob_sums
from rrhf.loss import rrhf_loss

LAYOUTS = ("concat", "shared")


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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def worker_step(args: argparse.Namespace) -> dict:
    """Time `--steps` optimiser steps of one layout (after one warm-up step) and report the peak memory."""
    model, groups = load(args)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    rewards = torch.randn(len(groups), args.k, generator=torch.Generator().manual_seed(1)).to(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 1):
        sync(args.device)
        start = time.perf_counter()
        with autocast(args):
            sums, lengths = group_logprob_sums(model, groups, layout=args.worker)
        loss = rrhf_loss(sums, lengths, rewards).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        if step > 0:
            times.append(time.perf_counter() - start)
    if args.device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"times": times, "peak_mib": peak_mib}


def worker_compare(args: argparse.Namespace) -> dict:
    """Largest absolute per-token log-prob differences: between the layouts (fp32 and the chosen dtype), and
    of each layout in the chosen dtype against fp32 concat (the size of plain rounding noise)."""
    model, groups = load(args)
    model.eval()
    runs = {}
    for name, ctx in (("fp32", contextlib.nullcontext), (args.dtype, lambda: autocast(args))):
        for layout in LAYOUTS:
            with torch.no_grad(), ctx():
                runs[name, layout] = [t for g in batch_response_logprobs(model, groups, layout=layout) for t in g]

    def diff(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(runs[a], runs[b]))

    out = {f"{name} concat vs shared": diff((name, "concat"), (name, "shared")) for name in ("fp32", args.dtype)}
    if args.dtype != "fp32":
        for layout in LAYOUTS:
            out[f"{args.dtype} {layout} vs fp32"] = diff((args.dtype, layout), ("fp32", "concat"))
    return out


def run_worker(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--device", args.device,
           "--dtype", args.dtype, "--queries", str(args.queries), "--k", str(args.k), "--steps", str(args.steps),
           "--seed", str(args.seed)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--queries", type=int, default=1, help="groups per step (the paper: 1 per device)")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per layout, interleaved")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process, after one warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=(*LAYOUTS, "compare"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "compare":
        print(json.dumps(worker_compare(args)))
        return
    if args.worker:
        print(json.dumps(worker_step(args)))
        return

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, dtype {args.dtype}")
    groups = make_groups(49152, args.queries, args.k, args.seed)
    n_prompt = [p.numel() for p, _ in groups]
    n_resp = [r.numel() for _, rs in groups for r in rs]
    print(f"{args.queries} group(s) x k={args.k}: prompt tokens {n_prompt}, response tokens {n_resp}")
    results: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
    for rep in range(args.reps):
        for layout in LAYOUTS:
            res = run_worker(layout, args)
            results[layout].append(res)
            print(f"  rep {rep} {layout:6s}: steps {', '.join(f'{t:.2f}' for t in res['times'])} s, "
                  f"peak {res['peak_mib']:.0f} MiB", flush=True)
    medians = {}
    responses = args.queries * args.k
    mem_kind = "CUDA max allocated" if args.device == "cuda" else "max RSS"
    for layout in LAYOUTS:
        times = [t for res in results[layout] for t in res["times"]]
        peaks = [res["peak_mib"] for res in results[layout]]
        medians[layout] = statistics.median(times)
        print(f"{layout:6s}: median step {medians[layout]:.3f} s over {len(times)} steps, "
              f"{responses / medians[layout]:.2f} responses/s, peak {mem_kind} median "
              f"{statistics.median(peaks):.0f} MiB (max {max(peaks):.0f})")
    print(f"speed-up shared vs concat: {medians['concat'] / medians['shared']:.2f}x")
    diff = run_worker("compare", args)
    print("max |per-token log-prob difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))


if __name__ == "__main__":
    main()
