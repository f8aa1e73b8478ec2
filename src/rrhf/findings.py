"""experiment=findings: the paper's qualitative claims, each tested on the arms of one sweep.

Every arm answers the same test prompts, at one or more training seeds (`seed=1,2,3`: every stage before
training is shared between seeds), so a comparison of two arms is a paired difference of per-prompt values
(reward, or the judge's perplexity of the response), paired seed by seed, with a 95% bootstrap interval that
resamples seeds and prompts (`rrhf.stats.paired_interval`). A comparison holds when the interval lies on the
claimed side of 0, fails when it lies on the other side, and is inconclusive otherwise; a claim holds when
all its comparisons hold and fails when any fails. The cost claim compares the mean over seeds of the
recorded wall time of the stages that produced each policy (sample + score + train for RRHF, the PPO stage
for PPO).

    python -m rrhf.findings results/findings --out paper_tables
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rrhf.arms import Arm, compare, spread, table_main, write_files
from rrhf.arms import load_arms as _load_arms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Comparison:
    a: str  # arm
    b: str  # arm it is compared with
    metric: str  # reward | ppl
    direction: str  # higher | lower | not_lower (a is not significantly below b)


@dataclass(frozen=True)
class Claim:
    statement: str
    source: str
    comparisons: tuple[Comparison, ...] = ()
    cost: tuple[str, str] | None = None  # (cheaper arm, dearer arm): wall time lower


CLAIMS = (
    Claim(
        "RRHF (DP) raises the reward over the initial policy",
        "Tables 2, 6",
        (Comparison("rrhf_dp", "initial", "reward", "higher"),),
    ),
    Claim("Removing L_rank lowers the reward", "Table 7", (Comparison("no_rank", "rrhf_dp", "reward", "lower"),)),
    Claim("IP-2 beats IP-1 (= DP)", "Table 6", (Comparison("ip2", "rrhf_dp", "reward", "higher"),)),
    Claim(
        "OP without KL raises the reward over DP but hurts perplexity (reward hacking)",
        "Table 6",
        (Comparison("op", "rrhf_dp", "reward", "higher"), Comparison("op", "rrhf_dp", "ppl", "higher")),
    ),
    Claim(
        "The KL term (beta 0.01) restrains OP: lower perplexity than OP without it",
        "Table 6",
        (Comparison("op_kl", "op", "ppl", "lower"),),
    ),
    Claim(
        "The same with the IMDB appendix's beta 0.1", "Tables 6, 10", (Comparison("op_kl_imdb", "op", "ppl", "lower"),)
    ),
    Claim(
        "Best-of-4 beats greedy decoding of the initial policy",
        "Table 2",
        (Comparison("best_of_4", "initial", "reward", "higher"),),
    ),
    Claim(
        "PPO raises the reward over the initial policy", "Table 2", (Comparison("ppo", "initial", "reward", "higher"),)
    ),
    Claim("RRHF is competitive with PPO in reward", "Table 2", (Comparison("rrhf_dp", "ppo", "reward", "not_lower"),)),
    # Wall time only: a sweep runs its jobs in one process, whose resident memory carries over from job to
    # job, so peak memory is compared by benchmarks/rrhf_vs_ppo.py (each variant in a fresh process).
    Claim("RRHF costs a fraction of PPO's wall time", "Sections 1, 4", cost=("rrhf_dp", "ppo")),
)


def load_arms(results: Path) -> dict[str, Arm]:
    """The finished arms of a findings sweep under `results`, by arm name, each with its seeds."""
    return _load_arms(results, "findings")


def comparison_verdict(direction: str, lo: float, hi: float) -> str:
    if direction == "higher":
        return "holds" if lo > 0 else "does not hold" if hi < 0 else "inconclusive"
    if direction == "lower":
        return "holds" if hi < 0 else "does not hold" if lo > 0 else "inconclusive"
    if direction == "not_lower":  # competitive: not significantly below
        return "does not hold" if hi < 0 else "holds"
    raise ValueError(f"unknown direction {direction!r}")


def claim_verdict(verdicts: list[str]) -> str:
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "does not hold" if "does not hold" in verdicts else "inconclusive"


def evaluate_claims(arms: dict[str, Arm]) -> pd.DataFrame:
    """One row per comparison (and per cost measure), with its claim's verdict."""
    rows = []
    for claim in CLAIMS:
        lines = []
        for c in claim.comparisons:
            found = compare(arms[c.a], arms[c.b], c.metric) if c.a in arms and c.b in arms else None
            if found is None:
                lines.append({"comparison": f"{c.metric}: {c.a} {_symbol(c.direction)} {c.b}", "verdict": "no run"})
                continue
            lines.append(
                {
                    "comparison": f"{c.metric}: {c.a} {_symbol(c.direction)} {c.b}",
                    **found,
                    "verdict": comparison_verdict(c.direction, found["ci_low"], found["ci_high"]),
                }
            )
        if claim.cost:
            cheap, dear = claim.cost
            a = arms[cheap].cost("seconds") if cheap in arms else None
            b = arms[dear].cost("seconds") if dear in arms else None
            if a is None or b is None:
                lines.append({"comparison": f"seconds: {cheap} < {dear}", "verdict": "no run"})
            else:  # means over each arm's seeds
                a, b = float(np.mean(a)), float(np.mean(b))
                lines.append(
                    {
                        "comparison": f"seconds: {cheap} < {dear}",
                        "a": a,
                        "b": b,
                        "difference": a - b,
                        "ratio": a / b,
                        "verdict": "holds" if a < b else "does not hold",
                    }
                )
        verdict = claim_verdict([line["verdict"] for line in lines])
        rows += [{"claim": claim.statement, "source": claim.source, "claim_verdict": verdict, **line} for line in lines]
    return pd.DataFrame(rows)


def _symbol(direction: str) -> str:
    return {"higher": ">", "lower": "<", "not_lower": ">~"}[direction]


def arm_table(arms: dict[str, Arm]) -> pd.DataFrame:
    """Per arm: seeds, and the mean and spread over seeds of its reward, perplexity and training cost."""
    rows = []
    for arm in arms.values():
        reward, ppl = arm.seed_means("reward"), arm.seed_means("ppl")
        seconds, memory = arm.cost("seconds"), arm.cost("peak_rss_mib")
        rows.append(
            {
                "arm": arm.name,
                "seeds": " ".join(map(str, arm.seeds)),
                "reward": reward.mean(),
                "reward_sd": spread(reward),
                "ppl": ppl.mean(),
                "ppl_sd": spread(ppl),
                "prompts": len(arm.prompts),
                "train_seconds": float(np.mean(seconds)) if seconds else None,
                "train_seconds_sd": spread(seconds) if seconds else None,
                "peak_rss_mib": max(memory) if memory else None,
            }
        )
    return pd.DataFrame(rows)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, (float, np.floating)) else str(value)


def _pm(mean: Any, sd: Any, digits: int = 3) -> str:
    """mean ± spread over seeds (the mean alone for one seed)."""
    if sd is None or pd.isna(sd):
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(sd, digits)}"


def markdown(claims: pd.DataFrame, arms: pd.DataFrame) -> str:
    seeds = sorted({s for text in arms["seeds"] for s in text.split()}, key=int) if len(arms) else []
    out = [
        "# Findings: the paper's claims on the embedded default",
        "",
        f"Training seeds: {', '.join(seeds)}. A and B are means over the seeds both arms ran and the test "
        "prompts; the interval of A - B is a paired bootstrap that resamples seeds, then prompts.",
        "",
        "| Claim | Source | Comparison | A | B | A - B [95% CI] | Seeds | Comparison verdict | Claim verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in claims.iterrows():
        if "ratio" in r and not pd.isna(r.get("ratio")):
            delta = f"ratio {r['ratio']:.2f}"
        elif pd.isna(r.get("difference")):
            delta = "-"
        else:
            delta = f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        seeds_used = "-" if pd.isna(r.get("seeds")) else int(r["seeds"])
        out.append(
            f"| {r['claim']} | {r['source']} | {r['comparison']} | {_fmt(r.get('a'))} | {_fmt(r.get('b'))} "
            f"| {delta} | {seeds_used} | {r['verdict']} | **{r['claim_verdict']}** |"
        )
    out += [
        "",
        "Per arm, the mean ± standard deviation over its seeds.",
        "",
        "| Arm | Seeds | Reward | PPL (paper mode) | Test prompts | Training wall s | Peak RSS MiB (sweep process) |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in arms.iterrows():
        out.append(
            f"| {r['arm']} | {r['seeds']} | {_pm(r['reward'], r['reward_sd'])} "
            f"| {_pm(r['ppl'], r['ppl_sd'], 2)} | {r['prompts']} "
            f"| {_pm(r['train_seconds'], r['train_seconds_sd'], 1)} "
            f"| {_fmt(r['peak_rss_mib'], 0)} |"
        )
    return "\n".join(out) + "\n"


def write_findings(results: Path, out: Path) -> list[Path]:
    """Evaluate every claim on the arms under `results`; write findings.md, findings.csv and findings.tex."""
    arms = load_arms(results)
    if not arms:
        raise FileNotFoundError(f"{results}: no finished run of experiment=findings")
    claims, table = evaluate_claims(arms), arm_table(arms)
    files = {
        "findings.md": markdown(claims, table),
        "findings.csv": claims.to_csv(index=False),
        "findings_arms.csv": table.to_csv(index=False),
        "findings.tex": claims.astype(object)
        .where(claims.notna(), "")
        .to_latex(
            index=False,
            escape=True,
            float_format="%.3f",
            caption="The paper's claims on the embedded default.",
            label="tab:findings",
        ),
    }
    written = write_files(out, files)
    log.info("findings: %d arms, %d claims -> %s", len(arms), len(CLAIMS), out / "findings.md")
    return written


class FindingsCallback(Callback):
    """Write the findings table when experiment=findings' sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_findings(Path(config.hydra.sweep.dir), Path(config.paths.tables))


def main(argv: list[str] | None = None) -> None:
    table_main(argv, doc=__doc__, experiment="findings", write=write_findings)


if __name__ == "__main__":
    main()
