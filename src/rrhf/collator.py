"""Tokenisation of a training example (paper or official rules) and the RRHF batch collator.

Tokenisation, semantics="official" (what the authors' code does): the query is tokenized alone with the
tokenizer's defaults (a LLaMA tokenizer adds BOS) and cut to its first model_max_length tokens; each
response is tokenized on its own from `response + eos_token`, so EOS is scored and, with a LLaMA tokenizer,
so is the BOS that starts the response segment. A response keeps model_max_length - |query| tokens (EOS is
lost when cut), except that a budget <= 1 truncates nothing (repo issue 27).

semantics="paper" (clean rules, paper-notes section 2): the query is left-truncated to `max_prompt_tokens`
exactly as sampling truncates prompts (`rrhf.generation.prompt_ids`: its end, the turn the responses
answer, is kept, and so is the BOS the tokenizer adds); each response is tokenized without special tokens,
cut to `max_response_tokens` (the generation length) and followed by exactly one EOS. No response loses a
token to a long query.

Both give pad_length = max over the group of |query| + |response_i|: the padded row length of the group
in the authors' layout, the denominator of the official loss. An example's `pad_responses` (the part of the
authors' six-candidate group that P or D drops) count in it too, as the authors padded before dropping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rrhf.generation import prompt_ids
from rrhf.loss import SEMANTICS


def tokenize_example(
    example: dict[str, Any],
    tokenizer,
    *,
    semantics: str = "paper",
    model_max_length: int = 192,
    max_prompt_tokens: int = 256,
    max_response_tokens: int = 128,
) -> dict[str, Any]:
    """Token ids of one example: {query_ids, responses_ids, scores, pad_length} (see the module docstring).

    `model_max_length` is the official budget (query + response); `max_prompt_tokens` and
    `max_response_tokens` are the paper rule's limits.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token, which every response ends with")
    texts = list(example["responses"]) + list(example.get("pad_responses", []))
    if semantics == "official":
        query = _ids(tokenizer, example["query"])[:model_max_length]
        budget = model_max_length - len(query)
        responses = [_ids(tokenizer, r + tokenizer.eos_token) for r in texts]
        if budget > 1:
            responses = [r[:budget] for r in responses]
    else:
        query = prompt_ids(tokenizer, example["query"], max_prompt_tokens)
        responses = [
            _ids(tokenizer, r, add_special_tokens=False)[:max_response_tokens] + [tokenizer.eos_token_id] for r in texts
        ]
    return {
        "query_ids": query,
        "responses_ids": responses[: len(example["responses"])],
        "scores": list(example["scores"]),
        "pad_length": max(len(query) + len(r) for r in responses),
    }


def _ids(tokenizer, text: str, **kwargs) -> list[int]:
    return list(tokenizer(text, **kwargs)["input_ids"])


def dense_ranks(scores: Sequence[float]) -> list[int]:
    """Scores replaced by their dense rank (0 = lowest; equal scores share a rank)."""
    order = {s: i for i, s in enumerate(sorted(set(scores)))}
    return [order[s] for s in scores]


class RRHFCollator:
    """Turn raw training examples (any number of queries, any k) into one batch.

    The batch: `groups`, a list of (query_ids, [response_ids, ...]) LongTensors; `reward_ranks` and `valid`,
    (B, k_max); `pad_lengths`, (B,). Rewards travel as dense integer ranks: the loss uses only their order,
    and a float tensor would be cast to the half-precision dtype under DeepSpeed, which can merge
    distinct rewards into ties.
    """

    def __init__(
        self,
        tokenizer,
        *,
        semantics: str = "paper",
        model_max_length: int = 192,
        max_prompt_tokens: int = 256,
        max_response_tokens: int = 128,
    ) -> None:
        self.tokenizer = tokenizer
        self.semantics = semantics
        self.limits = {
            "model_max_length": model_max_length,
            "max_prompt_tokens": max_prompt_tokens,
            "max_response_tokens": max_response_tokens,
        }

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Collate a list of {query, responses, scores} examples."""
        tokenized = [tokenize_example(e, self.tokenizer, semantics=self.semantics, **self.limits) for e in examples]
        k_max = max(len(t["responses_ids"]) for t in tokenized)
        ranks = torch.zeros(len(tokenized), k_max, dtype=torch.long)
        valid = torch.zeros(len(tokenized), k_max, dtype=torch.bool)
        groups = []
        for b, t in enumerate(tokenized):
            k = len(t["responses_ids"])
            ranks[b, :k] = torch.tensor(dense_ranks(t["scores"]))
            valid[b, :k] = True
            groups.append(
                (
                    torch.tensor(t["query_ids"], dtype=torch.long),
                    [torch.tensor(r, dtype=torch.long) for r in t["responses_ids"]],
                )
            )
        pad_lengths = torch.tensor([t["pad_length"] for t in tokenized], dtype=torch.long)
        return {"groups": groups, "reward_ranks": ranks, "valid": valid, "pad_lengths": pad_lengths}


class LMCollator:
    """Batches for supervised fine-tuning on whole texts, as trlX's sft_hh trains (paper-notes section 7).

    Each example's text is its query followed by its first response (the data set's chosen one, joined
    without a separator, as sft_hh joins prompt and chosen), tokenized without special tokens and cut to
    its last `max_length` tokens. Every token is a label: the loss covers prompt and response. Rows are
    right-padded; padding is masked and carries no label.
    """

    def __init__(self, tokenizer, *, max_length: int = 1024) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate {query, responses, ...} examples into input_ids, attention_mask and labels."""
        rows = [
            _ids(self.tokenizer, e["query"] + e["responses"][0], add_special_tokens=False)[-self.max_length :]
            for e in examples
        ]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = labels[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
