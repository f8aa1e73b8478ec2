"""CPU training steps with glibc's default malloc vs `rrhf.placement.keep_freed_cpu_memory`.

Each variant runs in its own process (the malloc setting holds for a whole process), the two alternating,
`--repeats` times each: one warm-up step, then `--steps` timed RRHF steps of the embedded policy (bf16
autocast, as trainer=cpu trains) on synthetic groups of the default run's shape (4 queries x 6 responses of
48 tokens). Prints the median wall time per step, user and system CPU seconds, minor page faults, the
ratio of the medians, and whether both variants computed the same summed log-probs bit for bit.

    python benchmarks/cpu_allocator.py [--steps 5] [--repeats 3] [--model embedded:smollm2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def one_variant(model_name: str, steps: int, keep_freed: bool) -> dict:
    import torch

    from rrhf.assets import load_causal_lm
    from rrhf.logprobs import group_logprob_sums
    from rrhf.placement import keep_freed_cpu_memory

    applied = keep_freed_cpu_memory() if keep_freed else False
    torch.manual_seed(0)
    model, _ = load_causal_lm(model_name)
    model.train()
    vocab = model.config.vocab_size
    batches = [
        [
            (torch.randint(vocab, (20,)), [torch.randint(vocab, (48,)) for _ in range(6)])
            for _ in range(4)  # queries per step (trainer=cpu's per_device_train_batch_size)
        ]
        for _ in range(steps + 1)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)
    checksum = []

    def step(groups) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums, lengths = group_logprob_sums(model, groups)
            loss = -(sums / lengths).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        checksum.append(sums.detach().double().sum().item())

    step(batches[0])  # warm-up: first-call costs are not what is compared
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for groups in batches[1:]:
        step(groups)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "applied": applied,
        "step_s": seconds / steps,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--variant", choices=("system", "keep_freed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child: one variant, its figures as JSON on the last line
        print(json.dumps(one_variant(args.model, args.steps, args.variant == "keep_freed")))
        return
    runs: dict[str, list[dict]] = {"system": [], "keep_freed": []}
    for _ in range(args.repeats):
        for variant in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--model", args.model],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    command = f"python benchmarks/cpu_allocator.py --steps {args.steps} --repeats {args.repeats} --model {args.model}"
    print(f"command: {command}")
    print(f"{'malloc':<11} {'step s (median)':>16} {'user s':>8} {'sys s':>8} {'minor faults':>13}")
    for variant, rows in runs.items():
        print(
            f"{variant:<11} {statistics.median(r['step_s'] for r in rows):>16.2f} "
            f"{statistics.median(r['user_s'] for r in rows):>8.1f} {statistics.median(r['sys_s'] for r in rows):>8.1f} "
            f"{statistics.median(r['minor_faults'] for r in rows):>13,.0f}"
        )
    ratio = statistics.median(r["step_s"] for r in runs["keep_freed"]) / statistics.median(
        r["step_s"] for r in runs["system"]
    )
    same = all(r["checksum"] == runs["system"][0]["checksum"] for rows in runs.values() for r in rows)
    print(f"keep_freed / system step time (medians): {ratio:.2f}; applied: {runs['keep_freed'][0]['applied']}")
    print(f"same log-probs bit for bit in every run: {same}")


if __name__ == "__main__":
    main()
