"""The statistics the paper's tables report: Table 6's sample statistics, Table 5's preference accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def preference_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float:
    """Share of pairs whose chosen score is strictly above the rejected one (ties count as wrong): Table 5."""
    if len(chosen_scores) != len(rejected_scores) or not chosen_scores:
        raise ValueError("preference_accuracy needs two non-empty score lists of equal length")
    chosen, rejected = np.asarray(chosen_scores, dtype=float), np.asarray(rejected_scores, dtype=float)
    return float(np.mean(chosen > rejected))


def sample_statistics(groups_of_scores: Sequence[Sequence[float]]) -> dict[str, float]:
    """Table 6's Mean / Std. / Max of the reward scores of a policy's training samples.

    mean: over all scores; std: their population standard deviation (numpy's default ddof=0; the paper
    does not say which); max: the mean over groups (queries) of each group's maximum.
    """
    if not groups_of_scores or any(len(g) == 0 for g in groups_of_scores):
        raise ValueError("sample_statistics needs at least one group and no empty group")
    flat = np.concatenate([np.asarray(g, dtype=float) for g in groups_of_scores])
    return {
        "mean": float(flat.mean()),
        "std": float(flat.std()),
        "max": float(np.mean([max(g) for g in groups_of_scores])),
    }
