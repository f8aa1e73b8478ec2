"""PPO for causal LMs, as trlX runs it in its `ppo_hh` example: the paper's PPO baseline (paper-notes section 7).

One round: sample responses to a slice of the training prompts, score them with a `Scorer`, turn each
score into per-token rewards (a KL penalty against the frozen initial policy on every token, the score
on the last), estimate advantages with GAE, then run clipped PPO updates over the round's rollouts:
`ppo_epochs` consecutive updates of each minibatch (trlX when the paper's numbers were made) or
`ppo_epochs` passes over all minibatches (trlX from August 2023). The value head sits on the policy's
last hidden state, as in trlX. Where trlX changed between versions, `PPOConfig` names both behaviours
and defaults to trlX v0.6.0, the version the paper's PPO row came from.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from rrhf import tracking
from rrhf.adapters import AdapterSettings, initial_policy, load_adapted_policy, merge_adapter, save_adapter
from rrhf.assets import load_causal_lm, load_tokenizer, resolve_model, save_causal_lm
from rrhf.data import strict_json
from rrhf.generation import check_context, left_truncated_batch, pad_id, sample, trlx_stop_cut
from rrhf.placement import Placement

log = logging.getLogger(__name__)


UPDATE_ORDERS = ("minibatch", "epoch")
CONTROLLER_KL = ("token_mean", "sequence_sum")


@dataclass
class PPOConfig:
    """PPO settings; the defaults are trlX's ppo_hh config (examples/hh/ppo_hh.py) at v0.6.0 (paper-notes section 7)."""

    learning_rate: float = 8e-6  # optimizer.kwargs.lr (its cosine schedule has eta_min = lr: constant)
    adam_beta1: float = 0.9  # optimizer.kwargs.betas
    adam_beta2: float = 0.95  # optimizer.kwargs.betas
    adam_eps: float = 1e-8  # optimizer.kwargs.eps
    weight_decay: float = 1e-6  # optimizer.kwargs.weight_decay
    iterations: int = 156  # rollout + update rounds: train.total_steps 10000 / 64 optimiser steps a round
    num_rollouts: int = 64  # method.num_rollouts
    chunk_size: int = 16  # method.chunk_size
    ppo_epochs: int = 4  # method.ppo_epochs
    batch_size: int = 4  # train.batch_size
    update_order: str = "minibatch"  # minibatch: ppo_epochs updates of each minibatch (v0.6.0); epoch: passes
    init_kl_coef: float = 0.05  # method.init_kl_coef
    target: float | None = 6.0  # method.target
    horizon: int = 10000  # method.horizon
    controller_kl: str = "token_mean"  # the KL the controller sees: token_mean (v0.6.0) or sequence_sum
    gamma: float = 1.0  # method.gamma
    lam: float = 0.95  # method.lam
    cliprange: float = 0.2  # method.cliprange
    cliprange_value: float = 0.2  # method.cliprange_value
    vf_coef: float = 1.0  # method.vf_coef
    scale_reward: str | None = "running"  # method.scale_reward
    cliprange_reward: float = 10.0  # method.cliprange_reward
    num_layers_unfrozen: int = 2  # model.num_layers_unfrozen
    top_k: int = 0  # method.gen_kwargs
    top_p: float = 1.0  # method.gen_kwargs
    temperature: float = 1.0  # generation default
    max_new_tokens: int = 128  # method.gen_kwargs
    max_prompt_tokens: int = 896  # train.seq_length 1024 - max_new_tokens 128, from the left
    prompt_bos: str = "none"  # trlX's prompt pipeline adds no special tokens (rrhf.generation.PROMPT_BOS)
    delta_reward: bool = False  # RM(prompt + output) - RM(prompt + chosen): ppo_hh from 2023-04-10 on
    reward_separator: str = ""  # between prompt and output in the reward model's text (the pipeline's scorer)
    save_every: int = 1  # rounds between resumable checkpoints
    seed: int = 42

    def __post_init__(self) -> None:
        if self.update_order not in UPDATE_ORDERS:
            raise ValueError(f"method.ppo.update_order={self.update_order!r}: expected one of {UPDATE_ORDERS}")
        if self.controller_kl not in CONTROLLER_KL:
            raise ValueError(f"method.ppo.controller_kl={self.controller_kl!r}: expected one of {CONTROLLER_KL}")


# ---------------------------------------------------------------------------------------------------
# The algorithm's pieces


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns over right-padded [batch, tokens] rows.

    A padded position has no value, so the last real token bootstraps from 0 (the episode ends there).
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    width = values.shape[1]
    for t in reversed(range(width)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < width else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (sample) variance over every entry of a right-padded minibatch, as trlX whitens its
    advantages: the padding's zeros count (the loss masks them afterwards)."""
    if x.numel() < 2:
        return x - x.mean()
    var, mean = torch.var_mean(x)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def controller_kl(log_ratio: torch.Tensor, prompt_width: int, response_width: int, form: str) -> float:
    """The KL estimate trlX feeds its adaptive controller, from one chunk of rollouts.

    `log_ratio` holds log pi - log rho of every token of each row after its first (prompt and response,
    as trlX takes it; 0 on padding). Both forms use the k3 estimator exp(r) - 1 - r. "token_mean" (trlX
    v0.6.0) is its mean over the chunk's whole padded grid, batch x (prompt width + response width - 1);
    "sequence_sum" (trlX from 2023-04-20) sums it over each row and averages the rows.
    """
    k3 = log_ratio.exp() - 1 - log_ratio
    if form == "token_mean":
        return k3.sum().item() / (log_ratio.shape[0] * (prompt_width + response_width - 1))
    return k3.sum(1).mean().item()


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019): nudged towards a target KL; fixed when target is None."""

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


class RunningMoments:
    """Mean and (sample) standard deviation of every value seen so far, merged batch by batch."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, xs: list[float]) -> None:
        n = len(xs)
        if n == 0:
            return
        mean = sum(xs) / n
        var = sum((x - mean) ** 2 for x in xs) / n
        total = self.count + n
        delta = mean - self.mean
        # Chan et al.'s merge of two (mean, population variance, count) summaries.
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total


def ppo_loss(
    logprobs: torch.Tensor,
    values: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss plus clipped value loss, each a mean over the unmasked tokens."""
    mask = mask.to(logprobs.dtype)
    n = mask.sum()
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_losses = torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    vf_loss = 0.5 * (vf_losses * mask).sum() / n

    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    pg_loss = (pg_losses * mask).sum() / n

    with torch.no_grad():
        stats = {
            "pg_loss": pg_loss.item(),
            "vf_loss": vf_loss.item(),
            "approx_kl": (0.5 * (log_ratio**2 * mask).sum() / n).item(),
            "clipfrac": (((ratio - 1).abs() > cliprange).float() * mask).sum().item() / n.item(),
            "vf_clipfrac": (((values - old_values).abs() > cliprange_value).float() * mask).sum().item() / n.item(),
        }
    return pg_loss + vf_coef * vf_loss, stats


# ---------------------------------------------------------------------------------------------------
# The model: policy + value head, a frozen reference


def value_head(hidden_size: int) -> nn.Sequential:
    """trlX's value head: a two-layer MLP on the last hidden state."""
    return nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, 1))


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a LLaMA-like (model.model.layers) or GPT-2/GPT-J (transformer.h) model."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        module = model
        for attribute in path.split("."):
            module = getattr(module, attribute, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__}: cannot find its decoder blocks")


def freeze_bottom_layers(model: nn.Module, num_layers_unfrozen: int) -> None:
    """Train only the top `num_layers_unfrozen` blocks (and what sits above them), as trlX; -1 trains all.

    The input embeddings freeze too, and with them a tied output matrix (SmolLM2 ties lm_head); with 0
    unfrozen blocks an untied lm_head freezes as well, leaving only the final norm and the value head.
    """
    if num_layers_unfrozen < 0:
        return
    blocks = list(decoder_blocks(model))
    frozen = blocks[: len(blocks) - num_layers_unfrozen] + [model.get_input_embeddings()]
    if num_layers_unfrozen == 0:
        frozen.append(model.get_output_embeddings())
    for module in frozen:
        module.requires_grad_(False)


_Maybe = torch.Tensor | None


def _forward(
    model: nn.Module,
    rows: list[tuple[list[int], list[int]]],
    pad: int,
    head: nn.Module | None = None,
    *,
    whole_rows: bool = False,
) -> tuple[torch.Tensor, _Maybe, torch.Tensor, _Maybe]:
    """Log-probabilities (and values) of each row's response tokens: [batch, longest response] + mask.

    Rows are prompt + response, right-padded, so positions count from 0 as they did in generation. The
    prediction of response token i sits at position len(prompt) - 1 + i; values are read there too.
    With `whole_rows`, also the log-probability of every token after the row's first ([batch, longest
    row - 1], 0 on padding), which the controller's KL estimate needs. (Not rrhf.logprobs: PPO needs the
    value head's reading of the same forward's hidden states.)
    """
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in rows]
    ids = torch.full((len(rows), max(lengths)), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for b, (p, r) in enumerate(rows):
        ids[b, : lengths[b]] = torch.tensor(p + r)
        attention[b, : lengths[b]] = 1
    ids, attention = ids.to(device), attention.to(device)
    # Only the positions from the earliest response on need logits; the rest would cost vocab-sized rows.
    first = 0 if whole_rows else min(len(p) for p, _ in rows) - 1
    out = model(
        input_ids=ids,
        attention_mask=attention,
        output_hidden_states=head is not None,
        logits_to_keep=ids.shape[1] - first,
    )
    width = max(len(r) for _, r in rows)
    steps = torch.arange(width, device=device)
    positions = torch.stack([len(p) - 1 + steps for p, _ in rows]).clamp(max=ids.shape[1] - 1)
    mask = torch.stack([steps < len(r) for _, r in rows]).float()
    targets = ids.gather(1, (positions + 1).clamp(max=ids.shape[1] - 1))
    logits = out.logits.gather(1, (positions - first)[..., None].expand(-1, -1, out.logits.shape[-1]))
    logprobs = logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1) * mask
    values = None
    if head is not None:
        hidden = out.hidden_states[-1]
        hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        values = head(hidden.float()).squeeze(-1) * mask
    row_logprobs = None
    if whole_rows:  # one row at a time: a [tokens, vocab] float copy, not [batch, tokens, vocab]
        row_logprobs = (
            torch.stack(
                [
                    out.logits[b, :-1].float().log_softmax(-1).gather(-1, ids[b, 1:, None]).squeeze(-1)
                    for b in range(len(rows))
                ]
            )
            * attention[:, 1:]
        )
    return logprobs, values, mask, row_logprobs


# ---------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: torch.Tensor  # of the response tokens under the policy that sampled them
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def response_tokens(tokenizer, new_ids: list[int]) -> tuple[list[int], str]:
    """The tokens to train on and the text to score, from a generation's new tokens, as trlX makes them.

    The new tokens are decoded (special tokens skipped) and cut at trlX's stop sequences ("Human:",
    "Assistant:" and their lower case, anywhere, then right-stripped). The text is re-tokenized (no special
    tokens), which is what is trained, so what is trained is what was scored; EOS follows when the text
    was cut or the generation ended with EOS. At least one token (EOS) is kept.
    """
    eos = tokenizer.eos_token_id
    ended = eos in new_ids
    if ended:
        new_ids = new_ids[: new_ids.index(eos)]  # what follows is padding
    text, trimmed = trlx_stop_cut(tokenizer.decode(new_ids, skip_special_tokens=True))
    ids = list(tokenizer(text, add_special_tokens=False).input_ids) if text else []
    if trimmed or ended or not ids:
        ids.append(eos)
    return ids, text


def _prompt_order(n_prompts: int, seed: int, start: int, count: int) -> list[int]:
    """Prompt indices start..start+count of an endless sequence of seeded shuffles of the prompt list."""
    order: list[int] = []
    for epoch in range(start // n_prompts, (start + count - 1) // n_prompts + 1):
        perm = list(range(n_prompts))
        random.Random(seed * 100_003 + epoch).shuffle(perm)
        order += perm
    offset = start - (start // n_prompts) * n_prompts
    return order[offset : offset + count]


@dataclass
class _State:
    """Everything a round changes, i.e. everything a checkpoint must hold."""

    round: int
    cursor: int  # prompts consumed so far
    kl: AdaptiveKLController
    moments: RunningMoments
    history: list[dict]


def _collect(
    policy,
    head,
    reference,
    tokenizer,
    scorer,
    prompts: list[str],
    references: list[str] | None,
    reference_scores: dict[int, float],
    state: _State,
    config: PPOConfig,
    autocast,
) -> tuple[list[Rollout], dict[str, float]]:
    """One round's rollouts with their advantages and returns (the policy in eval mode, no gradients).

    The stats hold `controller_kl`, the KL estimate the round's controller updates use (None with a
    fixed coefficient, which needs none).
    """
    device = next(policy.parameters()).device
    indices = _prompt_order(len(prompts), config.seed, state.cursor, config.num_rollouts)
    rollouts: list[Rollout] = []
    raw, deltas, kls, chunk_kls = [], [], [], []
    adaptive = config.target is not None
    policy.eval()
    head.eval()
    for at in range(0, len(indices), config.chunk_size):
        chunk = indices[at : at + config.chunk_size]
        batch = left_truncated_batch(
            tokenizer, [prompts[i] for i in chunk], config.max_prompt_tokens, bos=config.prompt_bos
        )
        check_context(
            policy, batch["input_ids"].shape[1], config.max_new_tokens, "method.ppo.max_prompt_tokens + max_new_tokens"
        )
        # Seeded per round and chunk, so a resumed run samples what an uninterrupted one would have.
        with torch.no_grad(), autocast():
            out = sample(
                policy,
                tokenizer,
                {k: v.to(device) for k, v in batch.items()},
                seed=config.seed * 1_000_003 + state.round * 10_007 + at,
                n=1,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k,
            )
        width = batch["input_ids"].shape[1]
        rows, texts, responses = [], [], []
        for b in range(len(chunk)):
            prompt = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
            ids, text = response_tokens(tokenizer, out[b, width:].tolist())
            rows.append((prompt, ids))
            # trlX's reward function sees the prompt as decoded from its (truncated) tokens.
            texts.append(tokenizer.decode(prompt, skip_special_tokens=True))
            responses.append(text)

        scores = [float(s) for s in scorer.score(texts, responses)]
        raw += scores
        if config.delta_reward and references is not None:
            missing = {i: text for i, text in zip(chunk, texts) if i not in reference_scores}
            if missing:
                got = scorer.score(list(missing.values()), [references[i] for i in missing])
                reference_scores.update(zip(missing, map(float, got)))
            scores = [s - reference_scores[i] for s, i in zip(scores, chunk)]
        deltas += scores
        # trlX (v0.6.0) scales each chunk by the running std including that chunk, then clips.
        state.moments.update(scores)
        scaled = torch.tensor(scores)
        if config.scale_reward == "running" and state.moments.std > 1e-8:
            scaled = scaled / state.moments.std
        scaled = scaled.clamp(-config.cliprange_reward, config.cliprange_reward)

        with torch.no_grad(), autocast():
            logprobs, values, mask, row_logprobs = _forward(policy, rows, pad_id(tokenizer), head, whole_rows=adaptive)
            with initial_policy(reference):
                ref_logprobs, _, _, ref_row_logprobs = _forward(reference, rows, pad_id(tokenizer), whole_rows=adaptive)
        if adaptive:
            chunk_kls.append(
                controller_kl(
                    row_logprobs - ref_row_logprobs,
                    max(len(p) for p, _ in rows),
                    max(len(r) for _, r in rows),
                    config.controller_kl,
                )
            )
        log_ratio = (logprobs - ref_logprobs) * mask
        kls += log_ratio.sum(1).tolist()
        rewards = -state.kl.value * log_ratio
        last = mask.sum(1).long() - 1
        rewards[torch.arange(len(rows)), last] += scaled.to(rewards.device)
        advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
        for b, (prompt, ids) in enumerate(rows):
            n = len(ids)
            rollouts.append(
                Rollout(
                    prompt,
                    ids,
                    logprobs[b, :n].cpu(),
                    values[b, :n].cpu(),
                    advantages[b, :n].cpu(),
                    returns[b, :n].cpu(),
                )
            )
    state.cursor += len(indices)
    stats = {
        "mean_score": sum(raw) / len(raw),
        "mean_reward_delta": sum(deltas) / len(deltas),
        "mean_kl": sum(kls) / len(kls),
        "controller_kl": _round_kl(chunk_kls, config.controller_kl),
        "mean_response_tokens": sum(len(r.response_ids) for r in rollouts) / len(rollouts),
    }
    return rollouts, stats


def _round_kl(chunk_kls: list[float], form: str) -> float | None:
    """A round's controller KL from its chunks': v0.6.0 kept the last chunk's; later trlX averages the
    chunks' square roots and squares the mean."""
    if not chunk_kls:
        return None
    if form == "token_mean":
        return chunk_kls[-1]
    return (sum(math.sqrt(max(k, 0.0)) for k in chunk_kls) / len(chunk_kls)) ** 2


def update_schedule(
    n_rollouts: int, batch_size: int, ppo_epochs: int, order: str, rng: random.Random
) -> list[tuple[list[int], bool]]:
    """One round's optimiser steps in trlX's order: each step's minibatch (rollout indices) and whether the
    KL controller moves after it.

    "minibatch" (trlX v0.6.0): the minibatches of one shuffle each get ppo_epochs consecutive updates, and
    the controller moves after each minibatch's last. "epoch" (trlX from 2023-07-31): ppo_epochs passes over
    freshly shuffled minibatches, the controller moving after each pass.
    """
    indices = list(range(n_rollouts))

    def shuffled() -> list[list[int]]:
        rng.shuffle(indices)
        return [indices[at : at + batch_size] for at in range(0, n_rollouts, batch_size)]

    steps: list[tuple[list[int], bool]] = []
    if order == "minibatch":
        for minibatch in shuffled():
            steps += [(minibatch, k == ppo_epochs - 1) for k in range(ppo_epochs)]
    else:
        for _ in range(ppo_epochs):
            minibatches = shuffled()
            steps += [(minibatch, j == len(minibatches) - 1) for j, minibatch in enumerate(minibatches)]
    return steps


def _update(
    policy,
    head,
    optimizer,
    rollouts: list[Rollout],
    state: _State,
    kl: float | None,
    pad: int,
    config: PPOConfig,
    autocast,
) -> dict[str, float]:
    """One round's clipped PPO updates (`update_schedule`); the KL controller moves with n_steps = batch_size
    from the round's controller KL, as trlX's post-backward callback does."""
    policy.train()
    head.train()
    totals: dict[str, float] = {}
    schedule = update_schedule(
        len(rollouts),
        config.batch_size,
        config.ppo_epochs,
        config.update_order,
        random.Random(config.seed * 1_000_003 + state.round),
    )
    for indices, move_controller in schedule:
        batch = [rollouts[i] for i in indices]
        with autocast():
            logprobs, values, mask, _ = _forward(policy, [(r.prompt_ids, r.response_ids) for r in batch], pad, head)
        old = {
            name: pad_sequence([getattr(r, name) for r in batch], batch_first=True).to(mask.device)
            for name in ("logprobs", "values", "advantages", "returns")
        }
        # trlX whitens the advantages of each minibatch.
        loss, stats = ppo_loss(
            logprobs,
            values,
            old["logprobs"],
            old["values"],
            whiten(old["advantages"]),
            old["returns"],
            mask,
            cliprange=config.cliprange,
            cliprange_value=config.cliprange_value,
            vf_coef=config.vf_coef,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if move_controller and kl is not None:
            state.kl.update(kl, n_steps=config.batch_size)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
    return {key: value / len(schedule) for key, value in totals.items()}


# ---------------------------------------------------------------------------------------------------
# Checkpoints and the training loop


def _trainable_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    # Frozen weights equal the initial model's, so the checkpoint holds only what training changes (with
    # adapters: the adapters' weights, under the PeftModel's parameter names).
    return {name: p.detach().cpu() for name, p in policy.named_parameters() if p.requires_grad}


# Settings a run may change when it resumes: how long it runs and how often it saves.
_RESUMABLE_CHANGES = {"iterations", "save_every"}


def _save_checkpoint(folder: Path, policy, head, optimizer, state: _State, config: PPOConfig) -> None:
    """Write the checkpoint beside the old one, then swap: a crash at any point leaves one complete copy."""
    work, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(
        {
            "policy": _trainable_state(policy),
            "head": head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "round": state.round,
            "cursor": state.cursor,
            "kl_coef": state.kl.value,
            "moments": vars(state.moments),
            "rng": rng,
            "config": asdict(config),
        },
        work / "state.pt",
    )
    (work / "log_history.json").write_text(strict_json(state.history, work / "log_history.json", indent=1))
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    work.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, policy, head, optimizer, state: _State, config: PPOConfig) -> bool:
    old = folder.with_name(folder.name + ".old")
    if not (folder / "state.pt").exists():
        if not (old / "state.pt").exists():
            return False
        folder = old  # a crash between the two renames of _save_checkpoint
    saved = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    changed = {k for k, v in asdict(config).items() if saved["config"].get(k) != v} - _RESUMABLE_CHANGES
    if changed:
        raise ValueError(
            f"{folder}: the checkpoint was made with other settings ({sorted(changed)}); "
            "resume with the same ones or use a new output folder"
        )
    unknown = policy.load_state_dict(saved["policy"], strict=False).unexpected_keys
    if unknown:
        raise ValueError(f"{folder}: checkpoint holds weights the model lacks: {unknown[:5]}")
    head.load_state_dict(saved["head"])
    optimizer.load_state_dict(saved["optimizer"])
    state.round, state.cursor, state.kl.value = saved["round"], saved["cursor"], saved["kl_coef"]
    vars(state.moments).update(saved["moments"])
    state.history = json.loads((folder / "log_history.json").read_text())
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return True


def train_ppo(
    model_path: str,
    prompts: list[str],
    references: list[str] | None,
    scorer,
    output_dir: Path,
    config: PPOConfig,
    *,
    where: Placement | None = None,
    trust_remote_code: bool = False,
    adapters: AdapterSettings | None = None,
) -> Path:
    """Train `model_path` with PPO on `prompts`, rewarded by `scorer`; resumes from output_dir/checkpoint.

    `references` (the data set's chosen responses) give the delta reward (`config.delta_reward`). Weights stay
    fp32, on `where.device` (the CPU by default); on a GPU a bf16/fp16 `where.dtype` runs the forward passes
    under autocast (a frozen LoRA base is then stored in bf16 when `where.dtype` is bf16). Returns
    output_dir / "model" (a plain Hugging Face causal-LM folder with the tokenizer: the policy without
    its value head, loadable by AutoModelForCausalLM).

    With `adapters` (LoRA / QLoRA) the policy trains its adapters only, on all its layers (num_layers_unfrozen
    does not apply, as in trlX, which freezes bottom layers only without a peft_config), the value head as a
    module of its own; the KL reference is the policy with its adapters disabled. The adapter is kept in
    output_dir / "adapter" and merged into the base in output_dir / "model".
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"{len(references)} references for {len(prompts)} prompts")
    where = where or Placement(torch.device("cpu"), torch.float32)
    device = where.device
    use_autocast = device.type == "cuda" and where.dtype != torch.float32

    def autocast():
        return torch.autocast("cuda", dtype=where.dtype) if use_autocast else contextlib.nullcontext()

    if adapters is None:
        policy, tokenizer = load_causal_lm(model_path, trust_remote_code=trust_remote_code)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        freeze_bottom_layers(policy, config.num_layers_unfrozen)
    else:
        tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # as load_causal_lm
        # On a GPU with a bf16 placement the frozen LoRA base is stored in bf16 (memory; it gets no updates, so bf16
        # storage loses nothing training would keep), the adapters in fp32, as peft / TRL / QLoRA do
        # (rrhf.adapters.base_dtype); elsewhere fp32. model/ is merged into a base reloaded in fp32.
        policy = load_adapted_policy(
            resolve_model(model_path),
            adapters,
            device=device,
            bf16=use_autocast and where.dtype == torch.bfloat16,
            trust_remote_code=trust_remote_code,
            seed=config.seed,
        )
        reference = policy  # run with its adapters disabled (initial_policy)
    torch.manual_seed(config.seed)  # the value head's initialisation
    head = value_head(policy.config.hidden_size)
    for module in {id(m): m for m in (policy, reference, head)}.values():
        if not getattr(module, "is_quantized", False):  # a 4-bit base is loaded where it runs
            module.to(device)
    trainable = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    state = _State(
        round=0,
        cursor=0,
        kl=AdaptiveKLController(config.init_kl_coef, config.target, config.horizon),
        moments=RunningMoments(),
        history=[],
    )
    checkpoint = output_dir / "checkpoint"
    if _load_checkpoint(checkpoint, policy, head, optimizer, state, config):
        log.info("ppo: resuming from %s after round %d", checkpoint, state.round)

    reference_scores: dict[int, float] = {}
    for _ in tqdm(range(state.round, config.iterations), initial=state.round, total=config.iterations, desc="ppo"):
        started = time.perf_counter()
        rollouts, stats = _collect(
            policy, head, reference, tokenizer, scorer, prompts, references, reference_scores, state, config, autocast
        )
        stats |= _update(
            policy, head, optimizer, rollouts, state, stats["controller_kl"], pad_id(tokenizer), config, autocast
        )
        state.round += 1
        row = {
            "round": state.round,
            "mean_score": stats["mean_score"],
            "mean_reward_delta": stats["mean_reward_delta"],
            "mean_kl": stats["mean_kl"],
            "controller_kl": stats["controller_kl"],
            "kl_coef": state.kl.value,
            "pg_loss": stats["pg_loss"],
            "vf_loss": stats["vf_loss"],
            "mean_response_tokens": stats["mean_response_tokens"],
            "seconds": time.perf_counter() - started,
        }
        state.history.append(row)
        (output_dir / "log_history.json").write_text(
            strict_json(state.history, output_dir / "log_history.json", indent=1)
        )
        tracking.log(row, prefix="ppo")
        log.info(
            "ppo round %d/%d: score %.4f, delta %.4f, kl %.4f (coef %.5f), pg %.4f, vf %.4f, %.1f tokens, %.1fs",
            state.round,
            config.iterations,
            row["mean_score"],
            row["mean_reward_delta"],
            row["mean_kl"],
            row["kl_coef"],
            row["pg_loss"],
            row["vf_loss"],
            row["mean_response_tokens"],
            row["seconds"],
        )
        if state.round % config.save_every == 0 or state.round == config.iterations:
            _save_checkpoint(checkpoint, policy, head, optimizer, state, config)

    model_dir, work = output_dir / "model", output_dir / "model.tmp"
    shutil.rmtree(work, ignore_errors=True)
    if adapters is None:
        save_causal_lm(policy, tokenizer, work)
    else:
        adapter_dir, adapter_work = output_dir / "adapter", output_dir / "adapter.tmp"
        shutil.rmtree(adapter_work, ignore_errors=True)
        save_adapter(policy, tokenizer, adapter_work)
        shutil.rmtree(adapter_dir, ignore_errors=True)
        adapter_work.rename(adapter_dir)
        merge_adapter(adapter_dir, work, trust_remote_code=trust_remote_code)
    (output_dir / "ppo_config.json").write_text(strict_json(asdict(config), "ppo_config.json", indent=1))
    shutil.rmtree(model_dir, ignore_errors=True)
    work.rename(model_dir)
    return model_dir
