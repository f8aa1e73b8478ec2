"""Candidate responses for each training prompt: the sampling settings of the paper's Table 1.

A setting is a generator (beam search, top-p sampling, diverse beam search, or none) plus whether the
data set's chosen and rejected responses are appended. Generation is its own cached artifact, keyed
without the dataset flag, so DP and D share one generation job.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rrhf.artifacts import crash_point
from rrhf.beam_search import diverse_beam_search
from rrhf.data import read_jsonl
from rrhf.generation import generate_batch

__all__ = ["diverse_beam_search", "generate_candidates", "generation_settings", "read_candidates"]

log = logging.getLogger(__name__)

# Sampling keys that do not change the first generation: labels, the dataset flag, which part of the group
# trains, and what later iterations or online refreshes do. DP, D, P (when it samples), IP-n and OP-k (and
# imdb_BP, imdb_B) share one generation.
NOT_GENERATION_KEYS = ("name", "dataset_responses", "train_on", "pad_over_group", "table10_setting", "iterations",
                       "refresh_steps", "kl_coef")


def generation_settings(sampling: dict[str, Any]) -> dict[str, Any]:
    """The part of a (resolved) sampling config that decides what is generated: the sample stage's key."""
    return {k: v for k, v in sampling.items() if k not in NOT_GENERATION_KEYS}


def generate_candidates(model, tokenizer, prompts: list[str], cfg: Any, out_file: Path, *, seed: int) -> None:
    """Append {"index", "responses"} lines to out_file for every prompt not already in it.

    Prompts are sorted by length so a batch wastes little padding; a job killed half-way keeps the
    lines it wrote and continues after them.
    """
    done: set[int] = set()
    if out_file.exists():
        # A kill can cut the last line short: keep the complete lines, redo the rest.
        kept = [line for line in out_file.read_text().splitlines(keepends=True) if _complete(line)]
        out_file.write_text("".join(kept))
        done = {json.loads(line)["index"] for line in kept}
    todo = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: len(prompts[i]))
    if done:
        log.info("sampling: resuming, %d of %d prompts already done", len(done), len(prompts))
    model.eval()
    bar = tqdm(total=len(prompts), initial=len(done), desc=f"sampling {cfg.name}", unit="prompt")
    with open(out_file, "a") as handle:
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            groups = generate_batch(model, tokenizer, [prompts[i] for i in chunk], cfg, seed=seed + chunk[0])
            for i, responses in zip(chunk, groups):
                handle.write(json.dumps({"index": i, "responses": responses}) + "\n")
            handle.flush()
            bar.update(len(chunk))
            crash_point("sample")
    bar.close()


def _complete(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return line.endswith("\n")


def read_candidates(path: Path) -> dict[int, list[str]]:
    """The sample stage's candidates, by prompt index."""
    return {row["index"]: row["responses"] for row in read_jsonl(path)}
