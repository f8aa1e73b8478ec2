"""Candidate responses for each training prompt: the sampling settings of the paper's Table 1.

A setting is a generator (beam search, top-p sampling, diverse beam search, or none) plus whether the
data set's chosen and rejected responses are appended. Generation is its own cached artifact, keyed
without the dataset flag, so DP and D share one generation job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rrhf.beam_search import diverse_beam_search
from rrhf.data import read_jsonl, write_jsonl
from rrhf.generation import generate_batch
from rrhf.sharding import length_sorted_batches, map_batches

__all__ = ["diverse_beam_search", "generation_settings", "read_candidates", "sample_candidates"]

log = logging.getLogger(__name__)

# Sampling keys that do not change the first generation: labels, the dataset flag, which part of the group
# trains, and what later iterations or online refreshes do. DP, D, P (when it samples), IP-n and OP-k (and
# imdb_BP, imdb_B) share one generation.
NOT_GENERATION_KEYS = (
    "name",
    "dataset_responses",
    "train_on",
    "pad_over_group",
    "table10_setting",
    "iterations",
    "refresh_steps",
    "kl_coef",
)


def generation_settings(sampling: dict[str, Any]) -> dict[str, Any]:
    """The part of a (resolved) sampling config that decides what is generated: the sample stage's key."""
    return {k: v for k, v in sampling.items() if k not in NOT_GENERATION_KEYS}


def sample_candidates(model, tokenizer, prompts: list[str], cfg: Any, work: Path, *, seed: int) -> None:
    """Write work/candidates.jsonl: {"index", "responses"} for every prompt, in prompt order.

    Prompts are batched in order of length (little padding); the batches are divided among the ranks of a
    launch, and a killed job continues after its last complete batch (`rrhf.sharding`). Each batch is
    seeded by its first prompt, so a sampled generator draws the same whoever draws it.
    """
    batches = length_sorted_batches([len(p) for p in prompts], cfg.batch_size)
    model.eval()
    results = map_batches(
        work,
        "candidates",
        batches,
        lambda batch: generate_batch(model, tokenizer, [prompts[i] for i in batch], cfg, seed=seed + batch[0]),
        desc=f"sampling {cfg.name}",
        unit="prompt",
        crash_stage="sample",
    )
    write_jsonl(work / "candidates.jsonl", ({"index": i, "responses": results[i]} for i in range(len(prompts))))


def read_candidates(path: Path) -> dict[int, list[str]]:
    """The sample stage's candidates, by prompt index."""
    return {row["index"]: row["responses"] for row in read_jsonl(path)}
