"""The cost of producing a policy: RRHF (DP sampling + scoring + training) vs PPO, same prompts, same reward.

The variants are experiment=findings' arms `rrhf_dp` and `ppo` (conf/findings/), on the embedded default
unless overrides say otherwise. Each measurement runs the variant's stages in a fresh subprocess with an
empty artifact folder, so nothing is cached and the peak resident memory is its own; the variants
alternate over --reps. Prints each variant's median wall time and peak memory (from the stages'
cost.json), the RRHF / PPO ratios, and the command.

    python benchmarks/rrhf_vs_ppo.py [--reps 1] [--threads N] [override ...]
    python benchmarks/rrhf_vs_ppo.py model=tiny task.train_size=8 ++method.ppo.num_rollouts=8   # seconds
(`++` for settings only one variant has.)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("rrhf_dp", "ppo")


def measure(arm: str, overrides: list[str]) -> dict[str, float]:
    """Child process: build the arm's policy from nothing; return its summed cost."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import rrhf  # noqa: F401  (registers the config resolvers)
    from rrhf import pipeline

    with (
        tempfile.TemporaryDirectory() as artifacts,
        initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"),
    ):
        cfg = compose(
            "config",
            overrides=[f"findings={arm}", f"paths.artifacts={artifacts}", *overrides],
            return_hydra_config=True,
        )
        HydraConfig.instance().set_config(cfg)
        pipeline._set_threads(cfg)
        if arm == "ppo":
            folders = [pipeline.ppo_stage(cfg, cfg.model.path).parent]
        else:
            sampled = pipeline.sample_stage(cfg, cfg.model.path)
            scored = pipeline.score_stage(cfg, cfg.model.path, sampled)
            folders = [sampled, scored, pipeline.train_stage(cfg, cfg.model.path, scored).parent]
        costs = [pipeline.stage_cost(f) for f in folders]
    return {"seconds": sum(c["seconds"] for c in costs), "peak_rss_mib": max(c["peak_rss_mib"] for c in costs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each measurement")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both variants")
    args = parser.parse_args()
    overrides = list(args.overrides) + ([f"threads={args.threads}"] if args.threads else [])
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, overrides)))
        return
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, *overrides]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant].append(json.loads(done.stdout.split("RESULT ", 1)[1]))
            print(f"rep {rep + 1} {variant}: {results[variant][-1]}", flush=True)
    medians = {
        v: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib")} for v, rs in results.items()
    }
    for variant, m in medians.items():
        print(f"{variant:8s} median {m['seconds']:8.1f} s   peak RSS {m['peak_rss_mib']:8.0f} MiB   ({args.reps} reps)")
    for key in ("seconds", "peak_rss_mib"):
        print(f"RRHF / PPO {key}: {medians['rrhf_dp'][key] / medians['ppo'][key]:.2f}")
    print("command: python benchmarks/rrhf_vs_ppo.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
