"""DPO, SimPO and CPO on pairs of scored candidates: the pairs a group gives, the batches, the losses.

The three methods train on (chosen, rejected) pairs taken from the score artifact RRHF trains on, a group of
k responses with their rewards (the authors' format {query, responses, scores}):

- `best_worst`: the highest- against the lowest-rewarded response (the first of tied maxima / minima); a
  group whose rewards all tie gives no pair and is counted as skipped;
- `all`: every ordered pair with r_i > r_j (equal rewards make no pair, as in RRHF's ranking term);
- `dataset`: the data set's chosen against its rejected response, whatever the reward says: the way these
  methods are usually trained. The score stage appends the data set's responses after the sampled ones in
  the order of `sampling.dataset_responses`, so their slots are the last ones of the group.

A batch holds whole prompts: each prompt once, with the responses its pairs use (shared-prefix layout of
`rrhf.logprobs`: one forward a prompt, each response's log-probs computed once however many pairs use it).
The losses (docs/paper-notes.md section 10), with s(y) = sum_t log pi(y_t | x, y_<t) over the response
tokens (EOS included) and |y| their number, each averaged over the batch's pairs:

- DPO: -log sigmoid(beta * [(s(y_w) - s_ref(y_w)) - (s(y_l) - s_ref(y_l))]), s_ref under the frozen initial
  policy (computed once per train stage, before the first step, and cached: no second model in training);
- SimPO: -log sigmoid(beta * (s(y_w) / |y_w| - s(y_l) / |y_l|) - gamma), no reference;
- CPO: -log sigmoid(beta * (s(y_w) - s(y_l))) plus alpha times the negative log-likelihood of the preferred
  responses, a mean over their tokens pooled over the batch (the CPO authors' cross-entropy, also TRL's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rrhf.collator import tokenize_example
from rrhf.logprobs import group_logprob_sums

PAIRS = ("best_worst", "all", "dataset")
LOSSES = ("dpo", "simpo", "cpo")
# What each objective is made of: the slide's columns are derived from these (rrhf.techniques).
USES_REFERENCE = {"dpo": True, "simpo": False, "cpo": False}
LENGTH_NORMALISED = {"dpo": False, "simpo": True, "cpo": False}
HAS_NLL = {"dpo": False, "simpo": False, "cpo": True}


def dataset_slots(n_responses: int, dataset_responses: Sequence[str]) -> tuple[int, int]:
    """Positions of the data set's chosen and rejected responses in a group of `n_responses`."""
    fields = list(dataset_responses)
    if "chosen" not in fields or "rejected" not in fields:
        raise ValueError(
            f"pairs=dataset needs the data set's chosen and rejected responses among the candidates: "
            f"sampling.dataset_responses is {fields}"
        )
    if n_responses < len(fields):
        raise ValueError(
            f"a group of {n_responses} responses cannot end with the {len(fields)} data set responses {fields}"
        )
    start = n_responses - len(fields)
    return start + fields.index("chosen"), start + fields.index("rejected")


def group_pairs(scores: Sequence[float], pairs: str, *, dataset_responses: Sequence[str] = ()) -> list[tuple[int, int]]:
    """The (chosen, rejected) index pairs of one group under rule `pairs` (see the module docstring)."""
    if pairs == "best_worst":
        best, worst = max(scores), min(scores)
        return [] if best == worst else [(list(scores).index(best), list(scores).index(worst))]
    if pairs == "all":
        return [(i, j) for i, si in enumerate(scores) for j, sj in enumerate(scores) if si > sj]
    if pairs == "dataset":
        return [dataset_slots(len(scores), dataset_responses)]
    raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")


def pair_examples(
    records: Sequence[dict[str, Any]], pairs: str, *, dataset_responses: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Training examples from {query, responses, scores} records, and what the pairing kept.

    An example is {query, responses, pairs}: the responses its pairs use (in group order) and the pairs as
    [chosen, rejected] indices into them. Groups without a pair are left out; the statistics count them.
    """
    examples, skipped, n_pairs, used = [], 0, 0, 0
    for record in records:
        index = group_pairs(record["scores"], pairs, dataset_responses=dataset_responses)
        if not index:
            skipped += 1
            continue
        kept = sorted({i for pair in index for i in pair})
        slot = {i: n for n, i in enumerate(kept)}
        examples.append(
            {
                "query": record["query"],
                "responses": [record["responses"][i] for i in kept],
                "pairs": [[slot[c], slot[r]] for c, r in index],
            }
        )
        n_pairs += len(index)
        used += len(kept)
    stats = {
        "pairs_rule": pairs,
        "prompts": len(records),
        "prompts_with_pairs": len(examples),
        "skipped_ties": skipped,
        "pairs": n_pairs,
        "responses_used_per_prompt": used / len(records) if records else 0.0,
    }
    return examples, stats


class PairwiseCollator:
    """Batches of `pair_examples` examples: {groups, pairs, reference}.

    `groups` is a list of (query_ids, [response_ids, ...]) LongTensors (tokenised as `rrhf.collator` does);
    `pairs` a (P, 3) LongTensor of [group, chosen slot, rejected slot]; `reference` the examples' cached
    reference log-prob sums as plain floats (a float tensor would be cast to half precision by DeepSpeed's
    input handling), or None when the examples carry none.
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
        self.limits = dict(
            semantics=semantics,
            model_max_length=model_max_length,
            max_prompt_tokens=max_prompt_tokens,
            max_response_tokens=max_response_tokens,
        )

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        groups, index = [], []
        for b, example in enumerate(examples):
            t = tokenize_example(
                {**example, "scores": [0.0] * len(example["responses"])}, self.tokenizer, **self.limits
            )
            groups.append(
                (
                    torch.tensor(t["query_ids"], dtype=torch.long),
                    [torch.tensor(r, dtype=torch.long) for r in t["responses_ids"]],
                )
            )
            index += [[b, c, r] for c, r in example["pairs"]]
        reference = [e["reference"] for e in examples] if all("reference" in e for e in examples) else None
        return {"groups": groups, "pairs": torch.tensor(index, dtype=torch.long).reshape(-1, 3), "reference": reference}


def reference_sums(
    model: torch.nn.Module,
    collator: PairwiseCollator,
    examples: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    layout: str = "shared",
) -> list[list[float]]:
    """Summed log-probs of every example's responses under `model` (no gradient), example by example."""
    out: list[list[float]] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            sums, _ = group_logprob_sums(model, collator(chunk)["groups"], layout=layout)
            out += [sums[b, : len(e["responses"])].double().tolist() for b, e in enumerate(chunk)]
    return out


@dataclass(frozen=True)
class PairwiseLossOutput:
    """`loss` and `nll` are scalars; `preference` (the per-pair term) and `margin` (the implicit reward of the
    chosen response minus that of the rejected one, beta included, SimPO's gamma not) have one value a pair."""

    loss: torch.Tensor
    preference: torch.Tensor
    nll: torch.Tensor
    margin: torch.Tensor


def pairwise_loss(
    loss: str,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    gamma: float = 0.0,
    alpha: float = 0.0,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
) -> PairwiseLossOutput:
    """The loss of `loss` ("dpo", "simpo" or "cpo") over P pairs, as the module docstring writes it.

    chosen, rejected: summed response log-probs (P,); *_lengths: their token counts (P,); ref_*: the
    reference model's sums (DPO only). gamma is SimPO's margin, alpha CPO's NLL weight.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if chosen.dim() != 1 or chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError(
            f"chosen and rejected must share one non-empty (P,) shape, got {tuple(chosen.shape)} and "
            f"{tuple(rejected.shape)}"
        )
    nll = chosen.new_zeros(())
    if loss == "dpo":
        if ref_chosen is None or ref_rejected is None:
            raise ValueError("DPO needs the reference model's log-probs of the chosen and rejected responses")
        margin = beta * ((chosen - ref_chosen.to(chosen)) - (rejected - ref_rejected.to(rejected)))
    elif loss == "simpo":
        margin = beta * (
            chosen / chosen_lengths.to(chosen).clamp_min(1.0) - rejected / rejected_lengths.to(rejected).clamp_min(1.0)
        )
    else:
        margin = beta * (chosen - rejected)
        nll = -chosen.sum() / chosen_lengths.to(chosen).sum().clamp_min(1.0)
    preference = -F.logsigmoid(margin - gamma if loss == "simpo" else margin)
    total = preference.mean() + alpha * nll if loss == "cpo" else preference.mean()
    return PairwiseLossOutput(loss=total, preference=preference, nll=nll, margin=margin)
