"""Figures of a collated sweep: training curves per run and candidate reward distributions per setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from rrhf.data import read_training_file  # noqa: E402


def training_curves(log_history: list[dict[str, Any]], title: str, out: Path) -> Path:
    """RRHF: loss with its rank and SFT parts over optimiser steps (the Trainer's log history).
    PPO: mean reward of the round's samples and their KL to the initial policy over rounds."""
    ppo = any("round" in e for e in log_history)
    x, ylabel = ("round", "value") if ppo else ("step", "loss")
    series = (
        (("mean_score", "reward of the samples"), ("mean_kl", "KL to the initial policy"))
        if ppo
        else (("loss", "loss"), ("rank_loss", "rank part"), ("sft_loss", "SFT part"))
    )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in series:
        points = [(e[x], e[key]) for e in log_history if key in e and x in e]
        if points:
            ax.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
    ax.set_xlabel("PPO round" if ppo else "optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def reward_distributions(scores_by_setting: dict[str, list[float]], out: Path) -> Path:
    """One histogram per sampling setting of its training candidates' rewards, on shared bins."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = [v for scores in scores_by_setting.values() for v in scores]
    low, high = min(values), max(values)
    bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    for setting, scores in sorted(scores_by_setting.items()):
        ax.hist(scores, bins=bins, histtype="step", linewidth=1.5, label=f"{setting} (n={len(scores)})")
    ax.set_xlabel("reward")
    ax.set_ylabel("candidates")
    ax.set_title("Reward of the training candidates by sampling setting", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def candidate_scores(train_file: Path) -> list[float]:
    """Every candidate's reward in a training file of the authors' format."""
    return [s for row in read_training_file(train_file) for s in row["scores"]]
