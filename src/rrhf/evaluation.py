"""Evaluation of a policy as in the paper's Tables 2, 5, 6 and 7 (paper-notes sections 5 and 6) and Table 10.

Greedy and best-of-n responses to the test prompts (the stop cut is applied before scoring), perplexity
of a response under a judge model (the authors' metric script, `paper`, and a corrected one, `exact`),
the policy's own scores of the test pairs (Table 5), and the policy's own perplexity on reference texts
(RL4LMs' IMDB metric, Table 10: `reference_perplexity`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rrhf.generation import (
    decode_new,
    eval_mode,
    left_truncated_batch,
    sample,
    stop_cut,
)
from rrhf.sharding import Mapper, length_sorted_batches, local_map

# The authors' metric script (the old `datasets` perplexity metric) truncated every text to
# model.config.max_length - 1 tokens to leave room for the prepended BOS. For gpt2-medium
# config.max_length is the generation default 20, so only the first 19 tokens of a response counted.
PAPER_MAX_TEXT_TOKENS = 19

PPL_MODES = ("paper", "exact")


def _clean(text: str) -> str:
    # The authors' preprocessing before the metric: one line, stripped, and never empty.
    text = text.replace("\n", " ").strip()
    return text if text else " "


def perplexities(
    texts: Sequence[str], model, tokenizer, *, mode: str, batch_size: int = 8, mapper: Mapper = local_map
) -> list[float]:
    """Perplexity of each text under `model`, in input order.

    Each text is cleaned (newlines to spaces, stripped, empty -> " "), tokenised without special tokens
    and scored after a prepended BOS token (EOS where the tokenizer has no BOS), which is context only.
    A text that gives no tokens (an empty response under a tokenizer without a token for " ") is scored
    as the judge's EOS token alone, i.e. the perplexity of ending the response at once; so every response,
    the policy's empty ones included, has a finite score and evaluation always finishes.
    mode="paper" reproduces the authors' metric script: the text is cut to its first 19 tokens and the
    perplexity is 2 ** (mean token NLL in nats). mode="exact" scores the whole text (cut only to the
    model's maximum positions) and returns exp(mean NLL). Batches are right-padded, padding unscored.
    Load the judge in fp32 for reference values (the metric module does); logits are upcast regardless.
    Memory grows with batch_size x text length x vocabulary size (exact mode scores whole texts).
    """
    if mode not in PPL_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {PPL_MODES}")
    context_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if context_id is None:
        raise ValueError("perplexities needs a tokenizer with a BOS or an EOS token to use as context")
    if mode == "paper":
        limit = PAPER_MAX_TEXT_TOKENS
    else:
        max_positions = getattr(model.config, "max_position_embeddings", None)
        limit = max_positions - 1 if max_positions else None
    cleaned = [_clean(t) for t in texts]
    ids = [x[:limit] for x in tokenizer(cleaned, add_special_tokens=False).input_ids] if cleaned else []
    # A text the judge's tokenizer has no tokens for (an empty response, cleaned to " ", under a tokenizer
    # that drops spaces) is scored as the judge's EOS alone: the response ended at once.
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else context_id
    ids = [x if x else [end_id] for x in ids]

    @torch.no_grad()
    def score(chunk: list[int]) -> list[float]:
        rows = [[context_id] + ids[i] for i in chunk]
        width = max(len(r) for r in rows)
        # Any id works as padding: padded positions are masked out and come after the text.
        input_ids = torch.tensor([r + [context_id] * (width - len(r)) for r in rows], device=model.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
        with eval_mode(model):
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        scored = mask[:, 1:].float()
        mean_nll = (nll * scored).sum(1) / scored.sum(1)
        # The metric script exponentiated a natural-log NLL in base 2; kept as is in paper mode.
        return (torch.exp2(mean_nll) if mode == "paper" else torch.exp(mean_nll)).tolist()

    results = mapper(
        length_sorted_batches([len(x) for x in ids], batch_size), score, desc=f"perplexity ({mode})", unit="response"
    )
    return [results[i] for i in range(len(ids))]


def policy_scores(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str, str]],
    *,
    model_max_length: int = 192,
    max_prompt_tokens: int = 256,
    max_response_tokens: int = 128,
    length_penalty: float = 1.0,
    batch_size: int = 8,
    mapper: Mapper = local_map,
) -> dict[str, tuple[list[float], list[float]]]:
    """A policy's own scores of (prompt, chosen, rejected) triples, as RRHF's ranking term sees them.

    Returns, per semantics, the chosen and the rejected scores (`rrhf.loss.candidate_scores`: `paper`
    divides a response's summed log-prob by its length, `official` by the pair's padded row length, the
    same for both responses of a pair). Feed them to `rrhf.stats.preference_accuracy` for Table 5. The
    truncation limits are those of `rrhf.collator.tokenize_example`, as training uses them.
    """
    from rrhf.collator import tokenize_example
    from rrhf.logprobs import group_logprob_sums
    from rrhf.loss import candidate_scores

    @torch.no_grad()
    def score(chunk: list[int]) -> list[dict[str, list[float]]]:
        """Per pair: {semantics: [chosen score, rejected score]}."""
        out: list[dict[str, list[float]]] = [{} for _ in chunk]
        scored: tuple[list, tuple[torch.Tensor, torch.Tensor]] | None = None
        for semantics in ("paper", "official"):
            examples = [
                tokenize_example(
                    {"query": pairs[i][0], "responses": list(pairs[i][1:]), "scores": [1.0, 0.0]},
                    tokenizer,
                    semantics=semantics,
                    model_max_length=model_max_length,
                    max_prompt_tokens=max_prompt_tokens,
                    max_response_tokens=max_response_tokens,
                )
                for i in chunk
            ]
            groups = [(e["query_ids"], e["responses_ids"]) for e in examples]
            # The two rules often cut the same tokens (short prompts and responses): the forward is then
            # the same one, so it runs once; only the divisor of each score differs.
            if scored is None or scored[0] != groups:
                with eval_mode(model):
                    scored = groups, group_logprob_sums(model, groups)
            sums, lengths = scored[1]
            pad_lengths = torch.tensor([e["pad_length"] for e in examples])
            scores = candidate_scores(
                sums, lengths, semantics=semantics, length_penalty=length_penalty, pad_lengths=pad_lengths
            )
            for row, pair_scores in zip(out, scores.tolist()):
                row[semantics] = pair_scores
        return out

    batches = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    results = mapper(batches, score, desc="policy scores", unit="pair")
    return {
        semantics: (
            [results[i][semantics][0] for i in range(len(pairs))],
            [results[i][semantics][1] for i in range(len(pairs))],
        )
        for semantics in ("paper", "official")
    }


def best_of_n_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    scorer,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    max_prompt_tokens: int = 256,
    seed: int = 0,
    min_new_tokens: int = 0,
    cut: bool = True,
    mapper: Mapper = local_map,
) -> list[str]:
    """Best-of-n (Table 2's Best-of-4 row; Table 8: n samples at inference, none at training).

    Samples n responses per prompt, applies the stop cut (unless `cut` is false), and keeps the one the
    reward model scores highest (the first on ties). Batches are seeded by their position, so the draw is
    reproducible.
    """

    @torch.no_grad()
    def pick(chunk: list[int]) -> list[str]:
        batch = left_truncated_batch(tokenizer, [prompts[i] for i in chunk], max_prompt_tokens)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with eval_mode(model):
            out = sample(
                model,
                tokenizer,
                batch,
                seed=seed + chunk[0],
                n=n,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                min_new_tokens=min_new_tokens,
            )
        texts = decode_new(tokenizer, out, batch["input_ids"].shape[1])
        candidates = [stop_cut(t) for t in texts] if cut else texts
        rewards = scorer.score([prompts[i] for i in chunk for _ in range(n)], candidates)
        groups = [rewards[k * n : (k + 1) * n] for k in range(len(chunk))]
        return [candidates[k * n + group.index(max(group))] for k, group in enumerate(groups)]

    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    results = mapper(batches, pick, desc=f"best-of-{n}", unit="prompt")
    best = [results[i] for i in range(len(prompts))]
    return best


def reference_perplexity(
    model, tokenizer, texts: Sequence[str], *, stride: int = 512, max_length: int | None = None
) -> float:
    """The model's perplexity on `texts`, as RL4LMs' IMDB metric computes it (paper-notes section 8).

    Not the judge's perplexity of responses: here the policy scores the task's reference texts. The texts
    are joined with blank lines into one token stream, read in windows of at most `max_length` tokens (the
    model's positions by default) whose starts advance by `stride`; each window's loss covers only the
    tokens no earlier window scored. Returns exp(summed token NLL / length of the stream).
    """
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids
    if max_length is None:
        max_length = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    stride = min(stride, max_length)  # a longer stride would leave tokens between windows unscored
    total, end = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, ids.shape[1], stride):
            begin, end = max(start + stride - max_length, 0), min(start + stride, ids.shape[1])
            window = ids[:, begin:end].to(model.device)
            labels = window.clone()
            labels[:, : -(end - start)] = -100  # context only: scored by an earlier window
            # The model's loss is the mean over the window's scored predictions; RL4LMs weighs it by the
            # number of new tokens (one more than the predictions of the first window).
            total += model(input_ids=window, labels=labels).loss.float().item() * (end - start)
    return math.exp(total / end)
