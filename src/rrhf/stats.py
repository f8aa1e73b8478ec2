"""Statistics: Table 6's sample statistics, Table 5's preference accuracy, and the paired bootstrap interval
the findings and techniques tables base their verdicts on."""

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
    does not say which); max: the mean over groups (queries) of each group's maximum. Scores must be finite;
    scores so large that their sums overflow (|score| near 1.8e308) are divided by the largest magnitude
    before summing and multiplied back, so the statistics stay finite.
    """
    if not groups_of_scores or any(len(g) == 0 for g in groups_of_scores):
        raise ValueError("sample_statistics needs at least one group and no empty group")
    flat = np.concatenate([np.asarray(g, dtype=float) for g in groups_of_scores])
    if not np.isfinite(flat).all():
        raise ValueError(f"sample_statistics needs finite scores, got {flat[~np.isfinite(flat)][0]}")
    maxima = np.asarray([max(g) for g in groups_of_scores], dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        stats = {"mean": float(flat.mean()), "std": float(flat.std()), "max": float(maxima.mean())}
        if not all(np.isfinite(v) for v in stats.values()):
            scale = float(np.abs(flat).max())
            stats = {
                "mean": float((flat / scale).mean()) * scale,
                "std": float((flat / scale).std()) * scale,
                "max": float((maxima / scale).mean()) * scale,
            }
    return stats


def paired_interval(
    a: np.ndarray | Sequence, b: np.ndarray | Sequence, *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of a - b and its percentile-bootstrap interval, the items paired.

    a, b: values per test prompt, shape (P,), or per training seed and test prompt, shape (S, P), paired
    seed by seed and prompt by prompt. Every seed answered every prompt (seeds and prompts are crossed), so a
    resample draws S seeds and P prompts with replacement, independently, and averages the differences over
    the drawn grid: the interval covers the variation between training seeds and between prompts. With one
    seed it is the plain paired bootstrap over prompts. With few seeds (3) the seed draw has few distinct
    outcomes, so the interval is a rough one.
    """
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if diff.ndim == 1:
        diff = diff[None, :]
    if diff.ndim != 2 or diff.size == 0:
        raise ValueError(f"paired_interval takes (prompts,) or (seeds, prompts) values, got shape {diff.shape}")
    n_seeds, n_prompts = diff.shape
    rng = np.random.default_rng(seed)
    seed_weights = (
        rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=resamples)
        if n_seeds > 1
        else np.ones((resamples, 1))
    )
    prompt_weights = rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=resamples)
    means = ((seed_weights @ diff) * prompt_weights).sum(axis=1) / (n_seeds * n_prompts)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(lo), float(hi)
