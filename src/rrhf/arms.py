"""The finished runs of a sweep, by arm and training seed: what the findings and techniques tables read.

An arm is one option of a config group (conf/findings/, conf/techniques/), run at one or more seeds. Runs are
found by the resolved config Hydra saved beside each `metrics.json` (never by folder names): the arm from
`hydra.runtime.choices`, the seed from the config. Each run contributes the per-prompt values of its final
evaluation (responses.jsonl) and the recorded cost of its stages (timing.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from rrhf.data import read_jsonl
from rrhf.stats import paired_interval

METRICS = {"reward": "reward", "ppl": "ppl_paper", "ppl_exact": "ppl_exact"}  # per-response fields


@dataclass
class Run:
    """One finished run of an arm at one seed."""

    arm: str
    seed: int
    folder: Path
    config: DictConfig
    metrics: dict[str, Any]  # the run's metrics.json
    per_prompt: dict[str, np.ndarray]  # metric -> values over the test prompts of the final evaluation
    prompts: list[str]
    stages: dict[str, dict]  # stage -> its cost.json (seconds, peak_rss_mib, ...), stages without one left out


@dataclass
class Arm:
    """An arm's runs, one per seed, in seed order."""

    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def prompts(self) -> list[str]:
        return self.runs[0].prompts

    def values(self, metric: str, seeds: list[int] | None = None) -> np.ndarray:
        """(seeds, prompts) values of `metric` at `seeds` (all of the arm's by default)."""
        by_seed = {r.seed: r for r in self.runs}
        return np.stack([by_seed[s].per_prompt[metric] for s in (self.seeds if seeds is None else seeds)])

    def seed_means(self, metric: str) -> np.ndarray:
        return self.values(metric).mean(axis=1)

    def cost(self, measure: str, stages: tuple[str, ...] | None = None) -> list[float] | None:
        """Per seed: the sum (seconds) or maximum (memory) of `measure` over the named stages (all by default);
        None when some seed recorded none."""
        out = []
        for run in self.runs:
            found = [
                c[measure]
                for name, c in run.stages.items()
                if (stages is None or name in stages) and c.get(measure) is not None
            ]
            if not found:
                return None
            out.append(sum(found) if measure == "seconds" else max(found))
        return out


def load_arms(results: str | Path, group: str) -> dict[str, Arm]:
    """The finished runs under `results` whose config chose an option of `group`, by arm, seeds in order.

    Two runs of one arm at one seed are an error (naming both folders): one would silently hide the other.
    The seeds of an arm must answer the same test prompts.
    """
    arms: dict[str, Arm] = {}
    for hydra_file in sorted(Path(results).rglob(".hydra/hydra.yaml")):
        folder = hydra_file.parent.parent
        name = OmegaConf.load(hydra_file).hydra.runtime.choices.get(group)
        if name is None or not (folder / "metrics.json").exists() or (folder / "FAILED").exists():
            continue
        config = OmegaConf.load(folder / ".hydra" / "config.yaml")
        metrics = json.loads((folder / "metrics.json").read_text())
        rows = read_jsonl(Path(metrics["final"]["artifact"]) / "responses.jsonl")
        timing = json.loads((folder / "timing.json").read_text()) if (folder / "timing.json").exists() else {}
        run = Run(
            name,
            int(config.seed),
            folder,
            config,
            metrics,
            {m: np.array([r.get(f, np.nan) for r in rows], dtype=float) for m, f in METRICS.items()},
            [r["prompt"] for r in rows],
            {k: v for k, v in (timing.get("stages") or {}).items() if v},
        )
        arm = arms.setdefault(name, Arm(name))
        twin = next((r for r in arm.runs if r.seed == run.seed), None)
        if twin is not None:
            raise ValueError(f"arm {name!r} ran twice at seed {run.seed}: {twin.folder} and {folder}; move one away")
        if arm.runs and run.prompts != arm.prompts:
            raise ValueError(f"arm {name!r}: {folder} answered other test prompts than {arm.runs[0].folder}")
        arm.runs.append(run)
    for arm in arms.values():
        arm.runs.sort(key=lambda r: r.seed)
    return arms


def compare(a: Arm, b: Arm, metric: str) -> dict[str, Any] | None:
    """a - b on `metric` over the seeds both ran (paired seed by seed and prompt by prompt): the arms' means,
    the difference and its 95% bootstrap interval over seeds and prompts (`rrhf.stats.paired_interval`).
    None when the two share no seed."""
    if a.prompts != b.prompts:
        raise ValueError(f"arms {a.name} and {b.name} answered different test prompts: not comparable")
    seeds = sorted(set(a.seeds) & set(b.seeds))
    if not seeds:
        return None
    va, vb = a.values(metric, seeds), b.values(metric, seeds)
    diff, lo, hi = paired_interval(va, vb)
    return {
        "a": float(va.mean()),
        "b": float(vb.mean()),
        "difference": diff,
        "ci_low": lo,
        "ci_high": hi,
        "seeds": len(seeds),
    }


def spread(values: np.ndarray | list[float]) -> float:
    """Standard deviation over seeds (ddof 1), NaN for a single seed."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def write_files(out: Path, files: dict[str, str]) -> list[Path]:
    """Write a sweep table's files (name -> text) into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    return [out / name for name in files]


def table_main(argv: list[str] | None, *, doc: str, experiment: str, write: Callable[[Path, Path], list[Path]]) -> None:
    """`python -m rrhf.<experiment> <sweep folder> [--out DIR]`: rewrite a sweep's table from its finished runs."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help=f"the sweep folder of experiment={experiment}")
    parser.add_argument("--out", type=Path, default=Path("paper_tables"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for path in write(args.results, args.out):
        print(path)
    print((args.out / f"{experiment}.md").read_text())
