"""experiment=techniques: the slide's five techniques, measured on the same candidates.

The slides compare PPO, DPO, SimPO, CPO and RRHF by pre-labelled input, responses per prompt, explicit
reward function, online / offline and reference model. This table puts the initial policy, SFT, RRHF on DP
candidates, DPO, SimPO, CPO (on pairs of the same DP candidates) and PPO side by side: the slide's five
columns derived from each run's own configuration, then what was measured: the reward and perplexities of
the greedy test responses, the policy's preference accuracy on the test pairs, the responses its training
used per prompt, the training stage's wall time and peak memory, and the reward difference against RRHF-DP
with a 95% paired bootstrap interval over training seeds and test prompts (`rrhf.stats.paired_interval`).

    python -m rrhf.techniques results/techniques --out paper_tables
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rrhf.arms import Arm, Run, compare, load_arms, spread, table_main, write_files
from rrhf.data import read_jsonl
from rrhf.pairwise import HAS_NLL, LENGTH_NORMALISED, LOSSES, USES_REFERENCE

log = logging.getLogger(__name__)

BASELINE = "rrhf_dp"
ORDER = ("initial", "sft", "rrhf_dp", "dpo", "simpo", "cpo", "ppo", "ppo_hh")  # table order; others follow
SLIDE = (
    "Pre-labelled input",
    "Responses per prompt",
    "Explicit reward function",
    "Online / offline",
    "Reference model",
)
NAMES = {
    "none": "Initial policy",
    "sft": "SFT",
    "rrhf": "RRHF",
    "dpo": "DPO",
    "simpo": "SimPO",
    "cpo": "CPO",
    "ppo": "PPO",
    "best_of_n": "Best-of-n",
}


def group_size(cfg: DictConfig) -> int:
    """Candidates a training group holds: the sampled ones, then the data set's."""
    s = cfg.sampling
    sampled = 0 if s.generator in ("none", "file") else int(s.num_candidates)
    return sampled + len(s.get("dataset_responses") or [])


def technique(cfg: DictConfig) -> str:
    """The row's name: the method, with its candidates (RRHF) or its pair rule (DPO, SimPO, CPO)."""
    name = cfg.method.name
    if name == "rrhf":
        return f"RRHF ({cfg.sampling.name})"
    if name in LOSSES:
        return f"{NAMES[name]} ({cfg.method.pairs})"
    return NAMES.get(name, name)


def _objective(cfg: DictConfig) -> str:
    """What plays the reward inside the loss of a method trained on ranked or paired responses."""
    m = cfg.method
    args = m.get("train_args") or {}
    if m.name == "rrhf":
        if float(args.get("length_penalty", 1.0)) == 0:
            return "log-likelihood (ranking)"
        per = "padded row length" if args.get("semantics") == "official" else "length"
        return f"log-likelihood per {per} (ranking)" + (", no L_rank" if float(args.get("rank_weight", 1)) == 0 else "")
    loss = m.name
    score = "mean log-likelihood" if LENGTH_NORMALISED[loss] else "log-likelihood"
    if USES_REFERENCE[loss]:
        score = f"{score} ratio to the reference"
    text = f"beta x {score} (beta {args.beta:g})"
    if loss == "simpo":
        text += f", margin gamma {args.gamma:g}"
    if HAS_NLL[loss]:
        text += f", + alpha x NLL (alpha {args.alpha:g})"
    return text


def slide_columns(cfg: DictConfig) -> dict[str, str]:
    """The slide's five columns for a run, derived from its composed configuration."""
    m, s = cfg.method, cfg.sampling
    reward = cfg.reward.name
    k = group_size(cfg)
    if m.name == "none":
        return dict.fromkeys(SLIDE, "-")
    if m.name == "sft":
        return dict(zip(SLIDE, ("yes: the data set's chosen responses", "1", "no: log-likelihood", "offline", "no")))
    if m.name == "ppo":
        p = m.ppo
        prompts = cfg.task.get("train_size")
        rollouts = f", {int(p.iterations) * int(p.num_rollouts) / int(prompts):g} a prompt" if prompts else ""
        scored = f"yes: {reward}" + (" minus its score of the chosen response" if p.get("delta_reward") else "")
        reference = (
            f"yes: KL penalty to the initial policy (coefficient {p.init_kl_coef:g}"
            f"{', adaptive' if p.get('target') else ''})"
            if float(p.init_kl_coef) > 0
            else "no"
        )
        return dict(
            zip(
                SLIDE,
                (
                    f"no: prompts only, {reward} scores the rollouts",
                    f"1 a rollout{rollouts}",
                    scored,
                    "online",
                    reference,
                ),
            )
        )
    ranked = f"yes: {reward} ranks {k} candidates before training"
    if m.name == "rrhf":
        refresh = s.get("refresh_steps")
        iterations = int(s.get("iterations", 1))
        mode = (
            f"online (candidates re-drawn every {refresh} steps)"
            if refresh
            else f"offline, {iterations} iterations"
            if iterations > 1
            else "offline"
        )
        kl = float(s.get("kl_coef") or 0.0)
        reference = f"yes: KL-shaped reward (beta {kl:g})" if kl else "no"
        return dict(zip(SLIDE, (ranked, f"{k} (ranked)", f"no: {_objective(cfg)}", mode, reference)))
    if m.name in LOSSES:
        pairs = m.pairs
        responses = {
            "best_worst": f"2 (best and worst of {k})",
            "all": f"2 a pair, up to {k * (k - 1) // 2} pairs of {k}",
            "dataset": "2 (the data set's chosen and rejected)",
        }[pairs]
        labelled = "yes: the data set's chosen over rejected" if pairs == "dataset" else ranked
        reference = "yes: the frozen initial policy (log-probs cached)" if USES_REFERENCE[m.name] else "no"
        return dict(zip(SLIDE, (labelled, responses, f"no: {_objective(cfg)}", "offline", reference)))
    return dict.fromkeys(SLIDE, "?")


def responses_used(run: Run) -> float | None:
    """Responses per training prompt the run's training used, from its artifacts (None: nothing trained)."""
    method, metrics = run.config.method.name, run.metrics
    if not metrics.get("train_log"):
        return None
    folder = Path(metrics["train_log"]).parent
    if method in LOSSES:
        return json.loads((folder / "pairs.json").read_text())["responses_used_per_prompt"]
    if method == "ppo":  # every rollout is one response to one training prompt
        rounds = len(json.loads(Path(metrics["train_log"]).read_text()))
        prompts = run.config.task.get("train_size")
        return rounds * int(run.config.method.ppo.num_rollouts) / int(prompts) if prompts else None
    inputs = json.loads((folder / "inputs.json").read_text())
    rows = read_jsonl(folder.parent.parent / "score" / inputs["scored"] / "train.jsonl")
    return float(np.mean([len(r["responses"]) for r in rows]))


def _train_cost(arm: Arm, measure: str) -> list[float] | None:
    # The stage that trained the policy (PPO's includes its rollouts); the shared sampling and scoring apart.
    return arm.cost(measure, stages=("train_1",))


def technique_table(arms: dict[str, Arm]) -> pd.DataFrame:
    """One row per arm: its technique, the slide's columns, the measured ones, the comparison with RRHF-DP."""
    order = [a for a in ORDER if a in arms] + sorted(a for a in arms if a not in ORDER)
    rows = []
    for name in order:
        arm = arms[name]
        first = arm.runs[0]
        reward, ppl, exact = (arm.seed_means(m) for m in ("reward", "ppl", "ppl_exact"))
        accuracy = [r.metrics["final"].get("rm_accuracy_paper") for r in arm.runs]
        used = [responses_used(r) for r in arm.runs]
        seconds, memory = _train_cost(arm, "seconds"), _train_cost(arm, "peak_rss_mib")
        cuda = _train_cost(arm, "cuda_peak_mib")
        row: dict[str, Any] = {
            "arm": name,
            "technique": technique(first.config),
            **slide_columns(first.config),
            "seeds": " ".join(map(str, arm.seeds)),
            "reward": reward.mean(),
            "reward_sd": spread(reward),
            "ppl_paper": ppl.mean(),
            "ppl_exact": exact.mean(),
            "preference_accuracy": (float(np.mean(accuracy)) if None not in accuracy else None),
            "responses_used_per_prompt": float(np.mean(used)) if None not in used else None,
            "train_seconds": float(np.mean(seconds)) if seconds else None,
            "train_seconds_sd": spread(seconds) if seconds else None,
            "train_peak_rss_mib": max(memory) if memory else None,
            "train_cuda_peak_mib": max(cuda) if cuda else None,
        }
        found = compare(arm, arms[BASELINE], "reward") if BASELINE in arms and name != BASELINE else None
        if found:
            row |= {
                "reward_vs_rrhf_dp": found["difference"],
                "ci_low": found["ci_low"],
                "ci_high": found["ci_high"],
                "seeds_compared": found["seeds"],
            }
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, (float, np.floating)) else str(value)


def _pm(mean: Any, sd: Any, digits: int = 3) -> str:
    return _fmt(mean, digits) if sd is None or pd.isna(sd) else f"{_fmt(mean, digits)} ± {_fmt(sd, digits)}"


def _setting(arms: dict[str, Arm]) -> str:
    cfg = next(iter(arms.values())).runs[0].config
    return (
        f"policy `{cfg.model.name}`, task `{cfg.task.name}`, reward `{cfg.reward.name}`, trainer `{cfg.trainer.name}`"
    )


def markdown(table: pd.DataFrame, arms: dict[str, Arm]) -> str:
    seeds = sorted({s for text in table["seeds"] for s in text.split()}, key=int)
    shared = arms[BASELINE].cost("seconds", ("sample_1", "score_1")) if BASELINE in arms else None
    out = [
        "# The slide's techniques on the same candidates",
        "",
        f"{_setting(arms)}; training seeds {', '.join(seeds)}. The slide's columns are derived from each "
        "run's configuration; the others are measured (means over seeds, ± their standard deviation).",
        "",
        "| Technique | " + " | ".join(SLIDE) + " |",
        "|---" * (len(SLIDE) + 1) + "|",
    ]
    for _, r in table.iterrows():
        out.append(f"| {r['technique']} | " + " | ".join(str(r[c]) for c in SLIDE) + " |")
    out += [
        "",
        "| Technique | Seeds | Reward | PPL (paper) | PPL (exact) | Preference accuracy "
        "| Responses used a prompt | Training wall s | Peak RSS MiB | Reward - RRHF-DP [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        delta = (
            "-"
            if pd.isna(r.get("reward_vs_rrhf_dp"))
            else f"{r['reward_vs_rrhf_dp']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        )
        memory = _fmt(r["train_peak_rss_mib"], 0)
        if not pd.isna(r.get("train_cuda_peak_mib")):
            memory += f" (GPU {_fmt(r['train_cuda_peak_mib'], 0)})"
        out.append(
            f"| {r['technique']} | {r['seeds']} | {_pm(r['reward'], r['reward_sd'])} "
            f"| {_fmt(r['ppl_paper'], 2)} | {_fmt(r['ppl_exact'], 2)} | {_fmt(r['preference_accuracy'])} "
            f"| {_fmt(r['responses_used_per_prompt'], 2)} | {_pm(r['train_seconds'], r['train_seconds_sd'], 1)} "
            f"| {memory} | {delta} |"
        )
    out += [
        "",
        "Preference accuracy: the share of test pairs whose chosen response the policy scores above the "
        "rejected one (length-normalised log-likelihood, Table 5's measure). Training wall time and peak "
        "resident memory are the train stage's (PPO's includes its rollouts); the jobs of a sweep share one "
        "process, so resident memory includes what earlier jobs left"
        + (
            f". RRHF, DPO, SimPO and CPO also share one sampling and scoring of the DP candidates "
            f"({_fmt(float(np.mean(shared)), 1)} s)."
            if shared
            else "."
        ),
    ]
    return "\n".join(out) + "\n"


def write_techniques(results: Path, out: Path) -> list[Path]:
    """Write techniques.md, .csv and .tex from the finished runs of experiment=techniques under `results`."""
    arms = load_arms(results, "techniques")
    if not arms:
        raise FileNotFoundError(f"{results}: no finished run of experiment=techniques")
    table = technique_table(arms)
    columns = [
        "technique",
        *SLIDE,
        "seeds",
        "reward",
        "ppl_paper",
        "ppl_exact",
        "preference_accuracy",
        "responses_used_per_prompt",
        "train_seconds",
        "train_peak_rss_mib",
        "reward_vs_rrhf_dp",
        "ci_low",
        "ci_high",
    ]
    tex = table.reindex(columns=columns).astype(object)
    files = {
        "techniques.md": markdown(table, arms),
        "techniques.csv": table.to_csv(index=False),
        "techniques.tex": tex.where(tex.notna(), "").to_latex(
            index=False,
            escape=True,
            float_format="%.3f",
            label="tab:techniques",
            caption="The slide's techniques on the same candidates ("
            + _setting(arms).replace("`", "").replace("_", r"\_")
            + ").",
        ),
    }
    written = write_files(out, files)
    log.info("techniques: %d arms -> %s", len(arms), out / "techniques.md")
    return written


class TechniquesCallback(Callback):
    """Write the techniques table when experiment=techniques' sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_techniques(Path(config.hydra.sweep.dir), Path(config.paths.tables))


def main(argv: list[str] | None = None) -> None:
    table_main(argv, doc=__doc__, experiment="techniques", write=write_techniques)


if __name__ == "__main__":
    main()
