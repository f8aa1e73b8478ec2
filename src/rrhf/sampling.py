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

import torch
from tqdm.auto import tqdm

from rrhf.artifacts import crash_point
from rrhf.beam_search import diverse_beam_search

__all__ = ["diverse_beam_search", "generate_candidates", "left_truncated_batch", "prompt_ids"]

log = logging.getLogger(__name__)


def prompt_ids(tokenizer, prompt: str, max_prompt_tokens: int) -> list[int]:
    """A prompt's token ids, left-truncated to its last `max_prompt_tokens` (the paper's rule).

    The tokenizer truncates, so its special tokens stay (a LLaMA BOS remains in front), as the
    authors' tokenizer with truncation_side="left" did.
    """
    saved = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(prompt, truncation=True, max_length=max_prompt_tokens).input_ids
    finally:
        tokenizer.truncation_side = saved


def left_padded(ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of token-id lists, left-padded (generation continues from the right edge)."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def left_truncated_batch(tokenizer, prompts: list[str], max_prompt_tokens: int) -> dict[str, torch.Tensor]:
    """Tokenise prompts with the paper's left truncation and left-pad them into one batch."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return left_padded([prompt_ids(tokenizer, p, max_prompt_tokens) for p in prompts], pad_id)


def check_context(model, prompt_tokens: int, new_tokens: int, keys: str) -> None:
    """Fail before generating when prompt + response cannot fit the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise ValueError(f"{keys}: {prompt_tokens} prompt + {new_tokens} new tokens exceed the model's "
                         f"context of {limit} positions; lower them")


def generate_batch(model, tokenizer, prompts: list[str], cfg: Any, seed: int) -> list[list[str]]:
    """`cfg.num_candidates` responses to each prompt by the setting's generator (OP-k calls it mid-training)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in left_truncated_batch(tokenizer, prompts, cfg.max_prompt_tokens).items()}
    check_context(model, batch["input_ids"].shape[1], cfg.max_new_tokens,
                  "sampling.max_prompt_tokens + sampling.max_new_tokens")
    common = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    n = cfg.num_candidates
    with torch.no_grad():
        if cfg.generator == "diverse_beam":
            out = diverse_beam_search(model, batch["input_ids"], batch["attention_mask"],
                                      num_beams=cfg.num_beams, num_beam_groups=cfg.num_beam_groups,
                                      diversity_penalty=cfg.diversity_penalty, num_return_sequences=n,
                                      **common)
        elif cfg.generator == "beam":
            out = model.generate(**batch, do_sample=False, num_beams=cfg.num_beams, num_return_sequences=n,
                                 **common)
        elif cfg.generator in ("top_p", "top_k"):
            torch.manual_seed(seed)  # seeded per batch, so a resumed job draws what an unbroken one would
            nucleus = dict(top_p=cfg.top_p, top_k=0) if cfg.generator == "top_p" else dict(top_k=cfg.top_k)
            out = model.generate(**batch, do_sample=True, temperature=cfg.temperature, num_return_sequences=n,
                                 **nucleus, **common)
        else:
            raise ValueError(f"sampling.generator={cfg.generator!r}: expected diverse_beam, beam, top_p, top_k "
                             "or none")
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def with_dataset_responses(sampled: list[str], row: dict[str, Any], fields: Any) -> list[str]:
    """A prompt's training group: its sampled candidates, then the data set's responses named in `fields`."""
    return list(sampled) + [row[f] for f in fields if row.get(f) is not None]


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
    with open(path) as handle:
        return {row["index"]: row["responses"] for row in map(json.loads, handle)}
