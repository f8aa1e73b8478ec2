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
from rrhf.sharding import Mapper, length_sorted_batches, local_map

# A new dialogue turn ends a response: the paper's evaluation cut (the authors' train.py:168-173).
STOP_STRINGS = ("\n\nHuman:", "\n\nAssistant:", "\n\nhuman:", "\n\nassistant:")
# trlX's ppo_hh stop sequences, found anywhere in the output (paper-notes section 7).
TRLX_STOP_SEQUENCES = ("Human:", "human:", "Assistant:", "assistant:")
# How a prompt keeps its special tokens when it is left-truncated (paper-notes sections 4 and 7):
# keep: the tokenizer truncates around the BOS it adds, so BOS stays in front;
# cut: BOS added, then the last max_prompt_tokens ids kept, so a longer prompt loses it (response_gen.py);
# none: no special tokens at all (trlX's PromptPipeline).
PROMPT_BOS = ("keep", "cut", "none")


def stop_cut(text: str) -> str:
    """Cut `text` at the first occurrence of any stop string (a new dialogue turn), then strip it."""
    cut = len(text)
    for stop in STOP_STRINGS:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut].strip()


def trlx_stop_cut(text: str) -> tuple[str, bool]:
    """trlX's cut of a PPO output (paper-notes section 7): at each stop sequence found anywhere in it, the
    text is cut there and right-stripped. Returns the text and whether anything was cut."""
    trimmed = False
    for stop in TRLX_STOP_SEQUENCES:
        at = text.find(stop)
        if at >= 0:
            text, trimmed = text[:at].rstrip(), True
    return text, trimmed


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


def prompt_ids(tokenizer, prompt: str, max_prompt_tokens: int, *, bos: str = "keep") -> list[int]:
    """A prompt's token ids, left-truncated to its last `max_prompt_tokens` (the paper's rule).

    `bos` (see PROMPT_BOS): "keep" lets the tokenizer truncate, so its special tokens stay (a LLaMA BOS
    remains in front); "cut" keeps the last ids of the tokenised prompt, BOS included, as the authors'
    generation script did (a longer prompt loses its BOS); "none" tokenises without special tokens (trlX).
    """
    if bos not in PROMPT_BOS:
        raise ValueError(f"prompt_bos={bos!r}: expected one of {PROMPT_BOS}")
    if bos != "keep":
        ids = tokenizer(prompt, add_special_tokens=bos == "cut").input_ids
        return list(ids[-max_prompt_tokens:])
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


def left_truncated_batch(
    tokenizer, prompts: Sequence[str], max_prompt_tokens: int, *, bos: str = "keep"
) -> dict[str, torch.Tensor]:
    """Tokenise prompts with the paper's left truncation (`prompt_ids`) and left-pad them into one batch."""
    return left_padded([prompt_ids(tokenizer, p, max_prompt_tokens, bos=bos) for p in prompts], pad_id(tokenizer))


def check_context(model, prompt_tokens: int, new_tokens: int, keys: str) -> None:
    """Fail before generating when prompt + response cannot fit the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise ValueError(
            f"{keys}: {prompt_tokens} prompt + {new_tokens} new tokens exceed the model's "
            f"context of {limit} positions; lower them"
        )


def decode_new(tokenizer, out: torch.Tensor, width: int) -> list[str]:
    """The generated part of each row of `out` (the prompt batch was `width` tokens), special tokens skipped.

    As the authors' generation script (paper-notes section 4): the whole row is decoded and the decoded
    prompt is removed from its front. A SentencePiece (LLaMA) tokenizer drops the space that opens a text
    when it decodes it alone, so decoding only the new tokens would lose the response's leading space,
    which the data set's responses have. A row whose text does not start with its prompt's (a tokenizer
    that rewrites text across the boundary) falls back to its new tokens.
    """
    rows = out.tolist()
    whole = tokenizer.batch_decode(rows, skip_special_tokens=True)
    prompts = tokenizer.batch_decode([row[:width] for row in rows], skip_special_tokens=True)
    return [
        text[len(prompt) :] if text.startswith(prompt) else tokenizer.decode(row[width:], skip_special_tokens=True)
        for row, text, prompt in zip(rows, whole, prompts)
    ]


def stopping(tokenizer, stop_at_eos: bool, min_new_tokens: int) -> dict[str, Any]:
    """generate()'s stop settings. The tokenizer's EOS, never the model's generation config: alpaca-native's
    says eos_token_id 1 ("<s>") where its EOS is "</s>" (2), so generation would not stop there."""
    # An explicit None turns the model's own EOS off, as the authors' GenerationConfig (no eos_token_id)
    # did with the transformers of early 2023: beams run to max_new_tokens and text after EOS is kept.
    out: dict[str, Any] = {"eos_token_id": tokenizer.eos_token_id if stop_at_eos else None}
    if min_new_tokens:
        out["min_new_tokens"] = min_new_tokens
    return out


def sample(
    model,
    tokenizer,
    batch: dict[str, torch.Tensor],
    *,
    seed: int,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_at_eos: bool = True,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """n sampled continuations of every prompt of a left-padded batch, seeded: a batch draws the same
    tokens whenever it is drawn (a resumed job, a rerun, another rank), whatever was drawn before it.
    `stop_at_eos=False` generates past EOS; `min_new_tokens` holds EOS back until that many tokens."""
    torch.manual_seed(seed)
    return model.generate(
        **batch,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_return_sequences=n,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id(tokenizer),
        **stopping(tokenizer, stop_at_eos, min_new_tokens),
    )


def generate_batch(model, tokenizer, prompts: Sequence[str], cfg: Any, seed: int) -> list[list[str]]:
    """`cfg.num_candidates` responses to each prompt by a sampling setting's generator (Table 1).

    Besides the generator's own settings, `cfg` may set `stop_at_eos` (default true; false generates to
    max_new_tokens and keeps the text after EOS, as the authors' script did), `prompt_bos` (see
    PROMPT_BOS, default keep) and `min_new_tokens` (default 0; not with diverse beam search).
    """
    device = next(model.parameters()).device
    stop_at_eos, min_new_tokens = bool(cfg.get("stop_at_eos", True)), int(cfg.get("min_new_tokens") or 0)
    batch = left_truncated_batch(tokenizer, prompts, cfg.max_prompt_tokens, bos=cfg.get("prompt_bos", "keep"))
    batch = {k: v.to(device) for k, v in batch.items()}
    check_context(
        model, batch["input_ids"].shape[1], cfg.max_new_tokens, "sampling.max_prompt_tokens + sampling.max_new_tokens"
    )
    n = cfg.num_candidates
    with eval_mode(model), torch.no_grad():
        if cfg.generator == "diverse_beam":
            if min_new_tokens:
                raise ValueError("sampling.min_new_tokens is not supported with generator=diverse_beam")
            # An empty EOS list: no token ends a beam (None would take the model's own EOS).
            out = diverse_beam_search(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                num_beams=cfg.num_beams,
                num_beam_groups=cfg.num_beam_groups,
                diversity_penalty=cfg.diversity_penalty,
                num_return_sequences=n,
                max_new_tokens=cfg.max_new_tokens,
                pad_token_id=pad_id(tokenizer),
                eos_token_id=tokenizer.eos_token_id if stop_at_eos else [],
            )
        elif cfg.generator == "beam":
            out = model.generate(
                **batch,
                do_sample=False,
                num_beams=cfg.num_beams,
                num_return_sequences=n,
                max_new_tokens=cfg.max_new_tokens,
                pad_token_id=pad_id(tokenizer),
                **stopping(tokenizer, stop_at_eos, min_new_tokens),
            )
        elif cfg.generator in ("top_p", "top_k"):
            nucleus = dict(top_p=cfg.top_p, top_k=0) if cfg.generator == "top_p" else dict(top_k=cfg.top_k)
            out = sample(
                model,
                tokenizer,
                batch,
                seed=seed,
                n=n,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                stop_at_eos=stop_at_eos,
                min_new_tokens=min_new_tokens,
                **nucleus,
            )
        else:
            raise ValueError(f"sampling.generator={cfg.generator!r}: expected diverse_beam, beam, top_p, top_k or none")
    texts = decode_new(tokenizer, out, batch["input_ids"].shape[1])
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def greedy_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    max_prompt_tokens: int = 256,
    min_new_tokens: int = 0,
    mapper: Mapper = local_map,
) -> list[str]:
    """Greedy continuations of `prompts` (`decode_new`: the new text, special tokens skipped), in input order.

    Prompts are left-truncated to `max_prompt_tokens` and left-padded; batches are formed from prompts
    sorted by length so that little padding is wasted. EOS is held back for `min_new_tokens`. No stop cut
    is applied here (see `stop_cut`).
    """
    encoded = [prompt_ids(tokenizer, p, max_prompt_tokens) for p in prompts]
    pad = pad_id(tokenizer)

    @torch.no_grad()
    def generate(chunk: list[int]) -> list[str]:
        batch = left_padded([encoded[i] for i in chunk], pad)
        with eval_mode(model):
            out = model.generate(
                input_ids=batch["input_ids"].to(model.device),
                attention_mask=batch["attention_mask"].to(model.device),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                **stopping(tokenizer, True, min_new_tokens),
            )
        return decode_new(tokenizer, out, batch["input_ids"].shape[1])

    results = mapper(
        length_sorted_batches([len(x) for x in encoded], batch_size), generate, desc="greedy", unit="prompt"
    )
    return [results[i] for i in range(len(prompts))]
