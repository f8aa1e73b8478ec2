"""rrhf_loss against a loop-by-loop reference written from the formulas (paper-notes sections 1 and 2)."""

from __future__ import annotations

import pytest
import torch

from rrhf.loss import RRHFLossOutput, rrhf_loss


def reference(logp, lengths, rewards, valid, pad, semantics, rank_weight, length_penalty):
    """Plain Python loops over queries and pairs; returns (loss, rank list, sft list)."""
    ranks, sfts = [], []
    for b in range(len(logp)):
        idx = [i for i in range(len(logp[b])) if valid[b][i]]
        if semantics == "paper":
            score = {i: logp[b][i] / max(lengths[b][i], 1) ** length_penalty for i in idx}
        else:
            score = {i: logp[b][i] / pad[b] ** length_penalty for i in idx}
        rank = 0.0
        for i in idx:
            for j in idx:
                if rewards[b][i] < rewards[b][j]:
                    rank += max(0.0, score[i] - score[j])
        best = idx[0]
        for i in idx:
            if rewards[b][i] > rewards[b][best]:
                best = i
        sft = -logp[b][best] if semantics == "paper" else -logp[b][best] / pad[b]
        ranks.append(rank)
        sfts.append(sft)
    loss = sum(rank_weight * r + s for r, s in zip(ranks, sfts)) / len(ranks)
    return loss, ranks, sfts


def random_case(seed: int, batch: int, k: int, *, ties: bool, invalid: bool):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (batch, k), generator=gen)
    logp = -torch.rand(batch, k, generator=gen, dtype=torch.float64) * lengths
    if ties:  # few distinct values: many ties, including in the maximum
        rewards = torch.randint(0, 3, (batch, k), generator=gen).double()
    else:
        rewards = torch.randn(batch, k, generator=gen, dtype=torch.float64)
    valid = torch.ones(batch, k, dtype=torch.bool)
    if invalid:
        valid = torch.rand(batch, k, generator=gen) > 0.3
        valid[:, 0] = True
        logp = torch.where(valid, logp, torch.full_like(logp, float("nan")))  # garbage must not leak
    pad = lengths.max(dim=1).values + torch.randint(5, 50, (batch,), generator=gen)
    return logp, lengths, rewards, valid, pad


CASES = [
    dict(seed=0, batch=1, k=6, ties=False, invalid=False),
    dict(seed=1, batch=4, k=6, ties=True, invalid=False),
    dict(seed=2, batch=3, k=5, ties=False, invalid=True),
    dict(seed=3, batch=5, k=4, ties=True, invalid=True),
    dict(seed=4, batch=2, k=1, ties=False, invalid=False),  # a single candidate: no pairs
]


@pytest.mark.parametrize("semantics", ["paper", "official"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rank_weight,length_penalty", [(1.0, 1.0), (2.5, 0.7)])
def test_matches_reference(semantics, case, rank_weight, length_penalty):
    logp, lengths, rewards, valid, pad = random_case(**case)
    out = rrhf_loss(
        logp,
        lengths,
        rewards,
        semantics=semantics,
        rank_weight=rank_weight,
        length_penalty=length_penalty,
        pad_lengths=pad,
        valid=valid,
    )
    loss, ranks, sfts = reference(
        logp.tolist(),
        lengths.tolist(),
        rewards.tolist(),
        valid.tolist(),
        pad.tolist(),
        semantics,
        rank_weight,
        length_penalty,
    )
    assert isinstance(out, RRHFLossOutput)
    assert out.rank.shape == out.sft.shape == (logp.shape[0],)
    torch.testing.assert_close(out.rank, torch.tensor(ranks, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.sft, torch.tensor(sfts, dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(out.loss.item() - loss) < 1e-6


def test_valid_none_means_all_valid_and_ties_give_no_pair():
    logp = torch.tensor([[-1.0, -5.0, -2.0]], dtype=torch.float64)
    lengths = torch.ones(1, 3, dtype=torch.long)
    rewards = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    out = rrhf_loss(logp, lengths, rewards)
    assert out.rank.item() == 0.0  # all rewards equal: no pair at all
    assert out.sft.item() == 1.0  # argmax ties go to the first candidate


def test_official_needs_pad_lengths():
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="pad_lengths"):
        rrhf_loss(x, torch.ones(2, 3), x, semantics="official")
    with pytest.raises(ValueError, match="semantics"):
        rrhf_loss(x, torch.ones(2, 3), x, semantics="other")


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_gradcheck(semantics):
    logp, lengths, rewards, valid, pad = random_case(seed=7, batch=3, k=5, ties=True, invalid=True)
    start = torch.where(valid, logp, torch.zeros_like(logp)).requires_grad_(True)

    def fn(x):
        out = rrhf_loss(
            x, lengths, rewards, semantics=semantics, rank_weight=1.5, length_penalty=0.8, pad_lengths=pad, valid=valid
        )
        return out.loss, out.rank, out.sft

    assert torch.autograd.gradcheck(fn, (start,), eps=1e-6, atol=1e-6)
    fn(start)[0].backward()
    assert torch.isfinite(start.grad).all()
    assert (start.grad[~valid] == 0).all()  # missing candidates get no gradient
