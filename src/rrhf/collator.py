"""Tokenisation of a training example (paper or official rules) and the RRHF batch collator.

Tokenisation, semantics="official" (what the authors' code does): the query is tokenized alone with the
tokenizer's defaults (a LLaMA tokenizer adds BOS) and cut to its first model_max_length tokens; each
response is tokenized on its own from `response + eos_token`, so EOS is scored and, with a LLaMA tokenizer,
so is the BOS that starts the response segment. A response keeps model_max_length - |query| tokens (EOS is
lost when cut), except that a budget <= 1 truncates nothing (repo issue 27).

semantics="paper" (clean rules): the query with the special tokens the tokenizer adds, responses without
special tokens followed by exactly one EOS; when the query is too long its end (the part next to the
response) is kept, together with its leading special tokens, leaving every response at least one token;
responses are cut to the remaining budget.

Both give pad_length = max over the group of |query| + |response_i|: the padded row length of the group
in the authors' layout, the denominator of the official loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rrhf.loss import SEMANTICS


def tokenize_example(example: dict[str, Any], tokenizer, *, semantics: str = "paper",
                     model_max_length: int = 192) -> dict[str, Any]:
    """Token ids of one example: {query_ids, responses_ids, scores, pad_length} (see the module docstring)."""
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token, which every response ends with")
    if semantics == "official":
        query = _ids(tokenizer, example["query"])[:model_max_length]
        budget = model_max_length - len(query)
        responses = [_ids(tokenizer, r + tokenizer.eos_token) for r in example["responses"]]
        if budget > 1:
            responses = [r[:budget] for r in responses]
    else:
        query = _paper_query(tokenizer, example["query"], model_max_length - 1)
        budget = model_max_length - len(query)
        responses = [(_ids(tokenizer, r, add_special_tokens=False) + [tokenizer.eos_token_id])[:budget]
                     for r in example["responses"]]
    return {"query_ids": query, "responses_ids": responses, "scores": list(example["scores"]),
            "pad_length": max(len(query) + len(r) for r in responses)}


def _ids(tokenizer, text: str, **kwargs) -> list[int]:
    return list(tokenizer(text, **kwargs)["input_ids"])


def _paper_query(tokenizer, text: str, limit: int) -> list[int]:
    full = _ids(tokenizer, text)
    if len(full) <= limit:
        return full
    plain = _ids(tokenizer, text, add_special_tokens=False)
    # Leading special tokens (BOS) are what the tokenizer adds in front of the text; keep them.
    n_prefix = len(full) - len(plain) if full[len(full) - len(plain):] == plain else 0
    keep = max(limit - n_prefix, 0)
    return full[:n_prefix] + (full[len(full) - keep:] if keep else [])


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

    def __init__(self, tokenizer, *, semantics: str = "paper", model_max_length: int = 192) -> None:
        self.tokenizer = tokenizer
        self.semantics = semantics
        self.model_max_length = model_max_length

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Collate a list of {query, responses, scores} examples."""
        tokenized = [tokenize_example(e, self.tokenizer, semantics=self.semantics,
                                      model_max_length=self.model_max_length) for e in examples]
        k_max = max(len(t["responses_ids"]) for t in tokenized)
        ranks = torch.zeros(len(tokenized), k_max, dtype=torch.long)
        valid = torch.zeros(len(tokenized), k_max, dtype=torch.bool)
        groups = []
        for b, t in enumerate(tokenized):
            k = len(t["responses_ids"])
            ranks[b, :k] = torch.tensor(dense_ranks(t["scores"]))
            valid[b, :k] = True
            groups.append((torch.tensor(t["query_ids"], dtype=torch.long),
                           [torch.tensor(r, dtype=torch.long) for r in t["responses_ids"]]))
        pad_lengths = torch.tensor([t["pad_length"] for t in tokenized], dtype=torch.long)
        return {"groups": groups, "reward_ranks": ranks, "valid": valid, "pad_lengths": pad_lengths}
