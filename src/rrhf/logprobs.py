"""Per-token log-probs log pi(y_i,t | x, y_i,<t) of k responses to a prompt, in two layouts.

- "concat", the authors' layout: one row per (prompt, response), right-padded, 2-D attention mask.
- "shared": one row per prompt: the prompt once, then all its responses packed after it. A 4-D block mask
  lets each response token see the prompt and the earlier tokens of its own response only, and position
  ids restart after the prompt for every response, so each token is computed from exactly the context of
  a plain forward of prompt + response (exact up to float rounding), without padding and with the prompt
  run once. The prompt's forward is part of the graph, so gradients reach it too.

Logits are computed at the scored positions only (the position before each response token; the prompt's
last position predicts every response's first token). The model's own forward does that projection,
through `logits_to_keep` given as a boolean (rows, seq) mask, so final-logit soft-capping (Gemma) or any
other head logic stays the model's own, and the whole computation is one call of the top-level module:
the call that FSDP (which unshards root-level weights such as the LM head only inside it), DeepSpeed and
accelerate's mixed-precision autocast wrap. The (positions x vocab) logits of the scored positions exist
at once (never those of the padding or the prompt); the log-softmax normaliser is then taken chunk by
chunk so its float32 temporaries stay bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

LAYOUTS = ("shared", "concat")
Ids = Sequence[int] | torch.Tensor
Group = tuple[Ids, Sequence[Ids]]
_LSE_CHUNK = 512  # positions per log-sum-exp chunk: 512 x 262k vocab x 4 bytes = 0.5 GB at most


@dataclass
class _Rows:
    input_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T) or (R, 1, T, T)
    position_ids: torch.Tensor | None  # (R, T)
    keep: torch.Tensor  # (R, T) bool: positions whose logits are needed
    pred_row: torch.Tensor  # (N,) row and column of the position predicting each scored token
    pred_col: torch.Tensor
    targets: torch.Tensor  # (N,) the scored tokens, responses in order
    counts: list[int]  # scored tokens of each response, groups in order, responses in order


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP, FSDP (1) and DeepSpeed engines keep the Hugging Face model in `.module`.
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _as_ids(ids: Ids, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)


def _device(model: torch.nn.Module, groups: Sequence[Group]) -> torch.device:
    # Prefer where the inputs already are (the Trainer moves them); parameters may be offloaded.
    for prompt, _ in groups:
        if isinstance(prompt, torch.Tensor):
            return prompt.device
    return next(_unwrap(model).parameters()).device


def _normalise(model: torch.nn.Module, groups: Sequence[Group]) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    device = _device(model, groups)
    out = []
    for prompt, responses in groups:
        prompt = _as_ids(prompt, device)
        if prompt.numel() == 0:
            raise ValueError("a prompt needs at least one token: the first response token is predicted from it")
        out.append((prompt, [_as_ids(r, device) for r in responses]))
    return out


def _concat_rows(groups: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> _Rows:
    pairs = [(p, r) for p, rs in groups for r in rs if r.numel() > 0]
    counts = [r.numel() for _, rs in groups for r in rs]
    device = groups[0][0].device
    width = max((p.numel() + r.numel() for p, r in pairs), default=1)
    ids = torch.zeros(max(len(pairs), 1), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    rows, cols, targets = [], [], []
    for row, (prompt, response) in enumerate(pairs):
        n_p, n_r = prompt.numel(), response.numel()
        ids[row, :n_p] = prompt
        ids[row, n_p : n_p + n_r] = response
        mask[row, : n_p + n_r] = True
        rows.append(torch.full((n_r,), row, device=device))
        cols.append(torch.arange(n_p - 1, n_p + n_r - 1, device=device))
        targets.append(response)
    return _finish(ids, mask.long(), None, rows, cols, targets, counts)


def _shared_rows(groups: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> _Rows:
    device = groups[0][0].device
    width = max(p.numel() + sum(r.numel() for r in rs) for p, rs in groups)
    ids = torch.zeros(len(groups), width, dtype=torch.long, device=device)
    pos = torch.zeros_like(ids)
    # Padding positions see only themselves: a fully masked query row would give NaN in attention.
    allowed = torch.eye(width, dtype=torch.bool, device=device).repeat(len(groups), 1, 1)
    rows, cols, targets, counts = [], [], [], []
    for row, (prompt, responses) in enumerate(groups):
        n_p = prompt.numel()
        ids[row, :n_p] = prompt
        pos[row, :n_p] = torch.arange(n_p, device=device)
        allowed[row, :n_p, :n_p] = torch.ones(n_p, n_p, dtype=torch.bool, device=device).tril()
        start = n_p
        for response in responses:
            n_r = response.numel()
            counts.append(n_r)
            if n_r == 0:
                continue
            end = start + n_r
            ids[row, start:end] = response
            pos[row, start:end] = torch.arange(n_p, n_p + n_r, device=device)
            allowed[row, start:end, :n_p] = True
            allowed[row, start:end, start:end] = torch.ones(n_r, n_r, dtype=torch.bool, device=device).tril()
            rows.append(torch.full((n_r,), row, device=device))
            # The first token is predicted from the prompt's last position, the others from their own row.
            cols.append(
                torch.cat([torch.tensor([n_p - 1], device=device), torch.arange(start, end - 1, device=device)])
            )
            targets.append(response)
            start = end
    return _finish(ids, allowed, pos, rows, cols, targets, counts)


def _finish(ids, mask, pos, rows, cols, targets, counts) -> _Rows:
    device = ids.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    pred_row = torch.cat(rows) if rows else empty
    pred_col = torch.cat(cols) if cols else empty
    keep = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    keep[pred_row, pred_col] = True
    return _Rows(ids, mask, pos, keep, pred_row, pred_col, torch.cat(targets) if targets else empty, counts)


def _attention_mask(model: torch.nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """Turn a (R, T, T) boolean block mask into the 4-D mask the model's attention expects."""
    config = _unwrap(model).config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return allowed[:, None]
    if impl == "eager":
        dtype = next(_unwrap(model).parameters()).dtype
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]
    raise ValueError(
        f"layout='shared' needs a custom 4-D attention mask, which attn_implementation={impl!r} "
        "does not take; load the model with attn_implementation='sdpa' or 'eager', or use "
        "layout='concat'"
    )


def _check_window(model: torch.nn.Module, groups: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> None:
    # A custom 4-D mask replaces the model's own masks, sliding-window ones included. That is exact only
    # while no prompt + response is longer than the window (the window then never cuts anything).
    config = _unwrap(model).config
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return
    longest = max(p.numel() + max((r.numel() for r in rs), default=0) for p, rs in groups)
    if longest > window:
        raise ValueError(
            f"layout='shared' is exact only within the model's sliding window ({window} tokens); "
            f"a prompt + response has {longest}: use layout='concat'"
        )


def _token_logprobs(model: torch.nn.Module, groups: Sequence[Group], layout: str) -> tuple[torch.Tensor, list[int]]:
    """Log-probs of every scored token (responses in order, concatenated) and each response's count."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not groups:
        raise ValueError("no groups to score")
    norm = _normalise(model, groups)
    if layout == "shared":
        _check_window(model, norm)
        rows = _shared_rows(norm)
        attention_mask = _attention_mask(model, rows.attention_mask)
    else:
        rows = _concat_rows(norm)
        attention_mask = rows.attention_mask
    if rows.targets.numel() == 0:
        # Nothing to score; keep the result attached to the graph so backward() still works.
        anchor = next(_unwrap(model).parameters())
        return anchor.new_zeros(0, dtype=torch.float32) + 0 * anchor.sum(), rows.counts

    out = model(
        input_ids=rows.input_ids,
        attention_mask=attention_mask,
        position_ids=rows.position_ids,
        logits_to_keep=rows.keep,
        use_cache=False,
    )
    logits = out.logits  # (kept positions, vocab), row-major order
    n_keep = int(rows.keep.sum())
    if logits.dim() != 2 or logits.shape[0] != n_keep:
        raise RuntimeError(
            f"{type(_unwrap(model)).__name__} returned logits of shape {tuple(logits.shape)} for "
            f"a boolean logits_to_keep with {n_keep} positions: the model's forward must take a "
            "(rows, seq) boolean logits_to_keep (transformers 5.24 causal LMs do)"
        )
    flat = torch.full(rows.keep.shape, -1, dtype=torch.long, device=rows.keep.device)
    flat[rows.keep] = torch.arange(logits.shape[0], device=flat.device)
    where = flat[rows.pred_row, rows.pred_col]

    lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(_LSE_CHUNK)])
    return logits[where, rows.targets].float() - lse[where], rows.counts


def response_logprobs(
    model: torch.nn.Module, prompt_ids: Ids, responses_ids: Sequence[Ids], *, layout: str = "shared"
) -> list[torch.Tensor]:
    """Per-token log-probs of each response given the prompt: a list of 1-D float32 tensors, differentiable."""
    return batch_response_logprobs(model, [(prompt_ids, responses_ids)], layout=layout)[0]


def batch_response_logprobs(
    model: torch.nn.Module, groups: Sequence[Group], *, layout: str = "shared"
) -> list[list[torch.Tensor]]:
    """`response_logprobs` for several (prompt_ids, responses_ids) groups in one forward."""
    logp, counts = _token_logprobs(model, groups, layout)
    pieces = list(logp.split(counts))
    out = []
    for _, responses in groups:
        out.append(pieces[: len(responses)])
        pieces = pieces[len(responses) :]
    return out


def group_logprob_sums(
    model: torch.nn.Module, groups: Sequence[Group], *, layout: str = "shared"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and scored-token counts of each group's responses, both (B, k_max).

    Slots past a group's own k hold 0 (sum) and 0 (length); the caller knows which exist.
    """
    logp, counts = _token_logprobs(model, groups, layout)
    device = logp.device
    n = len(counts)
    counts_t = torch.tensor(counts, dtype=torch.long, device=device)
    segment = torch.repeat_interleave(torch.arange(n, device=device), counts_t)
    flat_sums = logp.new_zeros(n).index_add(0, segment, logp)
    k_max = max(len(rs) for _, rs in groups)
    g_idx = torch.tensor([g for g, (_, rs) in enumerate(groups) for _ in rs], dtype=torch.long, device=device)
    i_idx = torch.tensor([i for _, rs in groups for i in range(len(rs))], dtype=torch.long, device=device)
    sums = logp.new_zeros(len(groups), k_max).index_put((g_idx, i_idx), flat_sums)
    lengths = torch.zeros(len(groups), k_max, dtype=torch.long, device=device).index_put((g_idx, i_idx), counts_t)
    return sums, lengths
