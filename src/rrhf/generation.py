"""What every stage that generates text shares: prompt truncation and padding, the generators of Table 1,
seeded sampling, decoding of the new tokens and the stop cut.

Sampling (training candidates), evaluation (greedy and best-of-n responses), OP-k refreshes and PPO
rollouts all generate; this module is the one place that decides how.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from rrhf.beam_search import diverse_beam_search

# A new dialogue turn ends a response (the paper's evaluation cut; trlX's ppo_hh stop sequences).
STOP_STRINGS = ("\n\nHuman:", "\n\nAssistant:", "\n\nhuman:", "\n\nassistant:")


def stop_cut(text: str) -> str:
    """Cut `text` at the first occurrence of any stop string (a new dialogue turn), then strip it."""
    cut = len(text)
    for stop in STOP_STRINGS:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut].strip()


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (GPT-2 and LLaMA have no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for a deterministic pass; the caller's training state comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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


def left_padded(ids: Sequence[Sequence[int]], pad: int) -> dict[str, torch.Tensor]:
    """A batch of token-id lists, left-padded (generation continues from the right edge)."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in ids])
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def left_truncated_batch(tokenizer, prompts: Sequence[str], max_prompt_tokens: int) -> dict[str, torch.Tensor]:
    """Tokenise prompts with the paper's left truncation and left-pad them into one batch."""
    return left_padded([prompt_ids(tokenizer, p, max_prompt_tokens) for p in prompts], pad_id(tokenizer))


def check_context(model, prompt_tokens: int, new_tokens: int, keys: str) -> None:
    """Fail before generating when prompt + response cannot fit the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise ValueError(f"{keys}: {prompt_tokens} prompt + {new_tokens} new tokens exceed the model's "
                         f"context of {limit} positions; lower them")


def decode_new(tokenizer, out: torch.Tensor, width: int) -> list[str]:
    """The generated part of each row of `out` (the prompt batch was `width` tokens), special tokens skipped."""
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def sample(model, tokenizer, batch: dict[str, torch.Tensor], *, seed: int, n: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """n sampled continuations of every prompt of a left-padded batch, seeded: a batch draws the same
    tokens whenever it is drawn (a resumed job, a rerun, another rank), whatever was drawn before it."""
    torch.manual_seed(seed)
    return model.generate(**batch, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                          num_return_sequences=n, max_new_tokens=max_new_tokens, pad_token_id=pad_id(tokenizer),
                          eos_token_id=tokenizer.eos_token_id)


def generate_batch(model, tokenizer, prompts: Sequence[str], cfg: Any, seed: int) -> list[list[str]]:
    """`cfg.num_candidates` responses to each prompt by a sampling setting's generator (Table 1)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in left_truncated_batch(tokenizer, prompts, cfg.max_prompt_tokens).items()}
    check_context(model, batch["input_ids"].shape[1], cfg.max_new_tokens,
                  "sampling.max_prompt_tokens + sampling.max_new_tokens")
    common = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id(tokenizer),
                  eos_token_id=tokenizer.eos_token_id)
    n = cfg.num_candidates
    with eval_mode(model), torch.no_grad():
        if cfg.generator == "diverse_beam":
            out = diverse_beam_search(model, batch["input_ids"], batch["attention_mask"],
                                      num_beams=cfg.num_beams, num_beam_groups=cfg.num_beam_groups,
                                      diversity_penalty=cfg.diversity_penalty, num_return_sequences=n,
                                      **common)
        elif cfg.generator == "beam":
            out = model.generate(**batch, do_sample=False, num_beams=cfg.num_beams, num_return_sequences=n,
                                 **common)
        elif cfg.generator in ("top_p", "top_k"):
            nucleus = dict(top_p=cfg.top_p, top_k=0) if cfg.generator == "top_p" else dict(top_k=cfg.top_k)
            out = sample(model, tokenizer, batch, seed=seed, n=n, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, **nucleus)
        else:
            raise ValueError(f"sampling.generator={cfg.generator!r}: expected diverse_beam, beam, top_p, top_k "
                             "or none")
    texts = decode_new(tokenizer, out, batch["input_ids"].shape[1])
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
