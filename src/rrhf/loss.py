"""The RRHF loss (Yuan et al., Eqs. 1-4) in the paper's form and in the form the authors' code optimises.

Inputs are per-candidate sums of response-token log-probs, so the loss is independent of how those were
computed (see `rrhf.logprobs`). Groups of different size share one (B, k) tensor through `valid`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEMANTICS = ("paper", "official")


def candidate_scores(
    logp_sums: torch.Tensor,
    lengths: torch.Tensor,
    *,
    semantics: str = "paper",
    length_penalty: float = 1.0,
    pad_lengths: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The policy's score p of each candidate, (B, k): its summed log-prob over denom ** length_penalty.

    denom is the response's own length ("paper", Eq. 1; an empty response counts as length 1) or the padded
    row length of its group ("official": the authors' in-place bug, repo issue 37). Invalid slots score 0.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if valid is None:
        valid = torch.ones_like(logp_sums, dtype=torch.bool)
    if semantics == "paper":
        denom = lengths.to(logp_sums).clamp_min(1.0)
    else:
        if pad_lengths is None:
            raise ValueError('semantics="official" needs pad_lengths, the padded row length of each group')
        pad = pad_lengths.to(logp_sums).reshape(-1)
        if pad.shape[0] != logp_sums.shape[0]:
            raise ValueError(f"pad_lengths must have shape ({logp_sums.shape[0]},), got {tuple(pad_lengths.shape)}")
        denom = pad[:, None].expand_as(logp_sums)
    denom = torch.where(valid, denom, torch.ones_like(denom))
    return torch.where(valid, logp_sums, torch.zeros_like(logp_sums)) / denom**length_penalty


@dataclass(frozen=True)
class RRHFLossOutput:
    """`loss` is a scalar; `rank` and `sft` are the per-query terms, shape (B,)."""

    loss: torch.Tensor
    rank: torch.Tensor
    sft: torch.Tensor


def rrhf_loss(
    logp_sums: torch.Tensor,
    lengths: torch.Tensor,
    rewards: torch.Tensor,
    *,
    semantics: str = "paper",
    rank_weight: float = 1.0,
    length_penalty: float = 1.0,
    pad_lengths: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> RRHFLossOutput:
    """RRHF loss over B queries with up to k candidates each.

    logp_sums, lengths, rewards, valid: (B, k); pad_lengths: (B,), the padded row length of each group in
    the authors' layout (needed for semantics="official"). Scores p are `candidate_scores`.
    rank = sum over valid pairs with r_i < r_j of max(0, p_i - p_j);
    sft = -logp_sums of the first highest-reward valid candidate ("official": divided by pad_lengths).
    loss = mean over queries of rank_weight * rank + sft. Every query needs at least one valid candidate.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if logp_sums.dim() != 2 or lengths.shape != logp_sums.shape or rewards.shape != logp_sums.shape:
        raise ValueError(
            f"logp_sums, lengths and rewards must share one (B, k) shape, got "
            f"{tuple(logp_sums.shape)}, {tuple(lengths.shape)}, {tuple(rewards.shape)}"
        )
    if valid is None:
        valid = torch.ones_like(logp_sums, dtype=torch.bool)
    valid = valid.to(device=logp_sums.device, dtype=torch.bool)
    if not bool(valid.any(dim=1).all()):
        raise ValueError("every query needs at least one valid candidate")
    # Invalid slots may hold anything (even NaN); zero them before any arithmetic so no NaN reaches the
    # gradient through a masked branch.
    logp = torch.where(valid, logp_sums, torch.zeros_like(logp_sums))
    rewards = rewards.to(logp.device)
    if not rewards.is_floating_point():
        rewards = rewards.double()

    scores = candidate_scores(
        logp, lengths, semantics=semantics, length_penalty=length_penalty, pad_lengths=pad_lengths, valid=valid
    )

    # pairs[b, i, j]: candidate i is ranked below candidate j (strictly lower reward), both valid.
    both = valid[:, :, None] & valid[:, None, :]
    pairs = (rewards[:, :, None] < rewards[:, None, :]) & both
    hinge = torch.relu(scores[:, :, None] - scores[:, None, :])
    rank = torch.where(pairs, hinge, torch.zeros_like(hinge)).sum(dim=(1, 2))

    # torch.argmax returns the first maximal index, which is the authors' tie rule.
    masked_rewards = torch.where(valid, rewards, torch.full_like(rewards, float("-inf")))
    best = masked_rewards.argmax(dim=1)
    sft = -logp.gather(1, best[:, None]).squeeze(1)
    if semantics == "official":  # a mean over the padded row, masked positions counting as zero
        sft = sft / pad_lengths.to(logp).reshape(-1)
    return RRHFLossOutput(loss=(rank_weight * rank + sft).mean(), rank=rank, sft=sft)
