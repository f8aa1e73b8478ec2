"""Diverse (group) beam search (Vijayakumar et al., 2016), the way transformers 4.x ran it.

transformers 5.x dropped group beam search from its core, but the paper's DBS candidates are defined by the
4.x behaviour, so this module reproduces `generate(num_beam_groups=G, diversity_penalty=λ, ...)` of
transformers 4.55 token for token, on top of a model's plain forward and its KV cache:

- the `num_beams` beams of a prompt form G groups of `num_beams // G`; group 0 starts from beam score 0 and
  every other beam of a group from -1e9, so the first step does not pick the same token in every beam;
- at each step one forward covers all beams of all prompts; then, group by group, the next-token log-probs
  are penalised by λ times the number of times each token was picked *at this step* by earlier groups of
  the same prompt (Hamming diversity), the beam scores are added, and the best 2 x group-size candidates
  of the group are walked in order: an eos candidate among the first group-size ranks becomes a finished
  hypothesis, other candidates fill the group's beams;
- a finished hypothesis scores sum-log-prob / (generated tokens incl. eos) ** length_penalty; each group
  of each prompt keeps its best group-size ones, and stops early (early_stopping=False) when its worst
  kept one beats the best score the running beams could still reach at the current length;
- at the end the open beams of unfinished groups join the finished ones, and the best
  `num_return_sequences` of all groups of a prompt are returned, eos-terminated and padded.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

__all__ = ["diverse_beam_search"]

# Processors that 4.x generate would add from a model's generation_config; none is implemented here, so a
# model that sets one is refused instead of being decoded differently. Values are the neutral settings.
_NEUTRAL_GENERATION_SETTINGS = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "guidance_scale": (None, 1.0),
    "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,),
    "watermarking_config": (None,),
}


class _FinishedHypotheses:
    """The best `size` finished hypotheses of one group of one prompt, in insertion order.

    The list order and the tie rules matter: the final selection sorts all groups' lists stably by score
    and takes from the end, so equal scores are resolved by position, as in transformers 4.x.
    """

    def __init__(self, size: int, length_penalty: float, early_stopping: bool | str, prompt_len: int, max_length: int):
        self.size = size
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.prompt_len = prompt_len
        self.max_length = max_length
        self.beams: list[tuple[float, torch.Tensor]] = []
        self.worst_score = 1e9

    def add(self, tokens: torch.Tensor, sum_logprobs: float, generated_len: int) -> None:
        score = sum_logprobs / (generated_len**self.length_penalty)
        if len(self.beams) < self.size or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.size:
                # Evict the lowest score (the earliest one on a tie); the next lowest becomes the bar.
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        """Whether no running beam can still enter the list; `cur_len` counts the prompt and the next token."""
        if len(self.beams) < self.size:
            return False
        if self.early_stopping is True:
            return True
        # early_stopping=False scores the best running beam at the current length, a heuristic that is
        # not exact for length_penalty > 0; "never" bounds it with the longest possible length instead.
        length = cur_len - self.prompt_len
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_length - self.prompt_len
        return self.worst_score >= best_sum_logprobs / length**self.length_penalty


def _token_list(token_ids) -> list[int]:
    if token_ids is None:
        return []
    if isinstance(token_ids, torch.Tensor):
        return token_ids.flatten().tolist()
    return [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in token_ids]


def _check_generation_config(generation_config) -> bool | str:
    """Refuse settings this implementation does not apply; return the early_stopping mode."""
    unsupported = {
        key: getattr(generation_config, key, None)
        for key, neutral in _NEUTRAL_GENERATION_SETTINGS.items()
        if getattr(generation_config, key, None) not in neutral
    }
    if unsupported:
        raise NotImplementedError(
            f"diverse_beam_search does not apply these generation_config settings of the model: {unsupported}"
        )
    early_stopping = getattr(generation_config, "early_stopping", None)
    early_stopping = False if early_stopping is None else early_stopping
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    return early_stopping


def _default_attention_mask(input_ids: torch.Tensor, pad: int | None, eos: list[int]) -> torch.Tensor:
    # As generate infers it: pad positions are masked only when the pad token occurs and differs from eos.
    if pad is not None and pad not in eos and bool((input_ids == pad).any()):
        return input_ids.ne(pad).long()
    return torch.ones_like(input_ids)


@torch.no_grad()
def diverse_beam_search(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_beams: int,
    num_beam_groups: int,
    diversity_penalty: float,
    num_return_sequences: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.LongTensor:
    """Diverse beam search with the results of transformers 4.55 `generate(num_beam_groups=...)`.

    `input_ids` is a left-padded (batch, prompt_len) batch. Returns a (batch * num_return_sequences, length)
    tensor of prompt + generated tokens, best first within each prompt, each finished hypothesis followed by
    one eos and then `pad_token_id`. `eos_token_id` / `pad_token_id` left as None take the model's
    generation_config values (pad falls back to the first eos), as `generate` does when they are not passed.
    """
    config = model.generation_config
    early_stopping = _check_generation_config(config)
    eos = _token_list(eos_token_id if eos_token_id is not None else config.eos_token_id)
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    if pad is None and eos:
        pad = eos[0]
    if num_beams < 2:
        raise ValueError(f"num_beams must be at least 2, got {num_beams}")
    if num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(f"num_beams ({num_beams}) must be a multiple of num_beam_groups ({num_beam_groups})")
    if num_beam_groups > 1 and not diversity_penalty > 0.0:
        raise ValueError("diversity_penalty must be > 0 with several beam groups, or the groups are identical")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in 1..num_beams ({num_beams}), got {num_return_sequences}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")

    device = input_ids.device
    batch, prompt_len = input_ids.shape
    max_length = prompt_len + max_new_tokens
    group_size = num_beams // num_beam_groups
    # Ranks beyond 1 + len(eos) per beam are never needed: at most len(eos) of them can be eos.
    num_candidates = max(2, 1 + len(eos)) * group_size
    if attention_mask is None:
        attention_mask = _default_attention_mask(input_ids, pad, eos)

    # Row b * num_beams + k is beam k of prompt b; group g holds beams g * group_size ... + group_size - 1.
    sequences = input_ids.repeat_interleave(num_beams, dim=0)
    mask = attention_mask.to(device).long().repeat_interleave(num_beams, dim=0)
    beam_scores = torch.full((batch, num_beams), -1e9, dtype=torch.float32, device=device)
    beam_scores[:, ::group_size] = 0.0
    finished = [
        [
            _FinishedHypotheses(group_size, length_penalty, early_stopping, prompt_len, max_length)
            for _ in range(num_beam_groups)
        ]
        for _ in range(batch)
    ]
    done = [[False] * num_beam_groups for _ in range(batch)]

    # A PeftModel's forward passes **kwargs on to its base model's: the base's signature says what it takes.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward_params = inspect.signature(base.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}
    cache = DynamicCache(config=model.config)
    step_ids = sequences

    while True:
        if "position_ids" in forward_params:
            # Positions count real tokens only, so left padding does not shift a prompt.
            positions = mask.cumsum(-1) - 1
            positions.masked_fill_(mask == 0, 1)
            extra["position_ids"] = positions[:, -step_ids.shape[1] :]
        logits = model(input_ids=step_ids, attention_mask=mask, cache=cache, use_cache=True, **extra).logits
        logprobs = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
        del logits
        vocab = logprobs.shape[-1]
        logprobs = logprobs.view(batch, num_beams, vocab)
        cur_len = sequences.shape[1] + 1  # length once this step's token is appended

        next_tokens = torch.empty((batch, num_beams), dtype=sequences.dtype, device=device)
        next_scores = torch.empty((batch, num_beams), dtype=torch.float32, device=device)
        source_rows = torch.empty((batch, num_beams), dtype=torch.long, device=device)
        picked_so_far = torch.zeros((batch, vocab), dtype=torch.long, device=device)
        for group in range(num_beam_groups):
            lo, hi = group * group_size, (group + 1) * group_size
            scores = logprobs[:, lo:hi]
            if group > 0 and diversity_penalty > 0.0:
                scores = scores - (diversity_penalty * picked_so_far).unsqueeze(1)
            scores = (scores + beam_scores[:, lo:hi].unsqueeze(-1)).reshape(batch, group_size * vocab)
            top_scores, top_ids = torch.topk(scores, num_candidates, dim=1, largest=True, sorted=True)
            top_beams = (top_ids // vocab).tolist()
            top_tokens = (top_ids % vocab).tolist()
            top_values = top_scores.tolist()
            group_tokens, group_scores, group_sources = [], [], []
            for b in range(batch):
                if done[b][group]:
                    # A finished group idles on pad tokens, copying beam `lo` of prompt 0 as 4.x does; its
                    # pads still count towards the diversity penalty of later groups.
                    group_tokens.append([pad] * group_size)
                    group_scores.append([0.0] * group_size)
                    group_sources.append([lo] * group_size)
                    continue
                tokens, values, sources = [], [], []
                for rank, (beam, token, value) in enumerate(zip(top_beams[b], top_tokens[b], top_values[b])):
                    row = b * num_beams + lo + beam
                    if token in eos:
                        # An eos ranked below the group size would not have made it into the beam.
                        if rank < group_size:
                            finished[b][group].add(sequences[row].clone(), value, cur_len - prompt_len)
                    else:
                        tokens.append(token)
                        values.append(value)
                        sources.append(row)
                        if len(tokens) == group_size:
                            break
                group_tokens.append(tokens)
                group_scores.append(values)
                group_sources.append(sources)
                done[b][group] = finished[b][group].is_done(top_values[b][0], cur_len)
            chosen = torch.tensor(group_tokens, dtype=sequences.dtype, device=device)
            next_tokens[:, lo:hi] = chosen
            next_scores[:, lo:hi] = torch.tensor(group_scores, dtype=torch.float32, device=device)
            source_rows[:, lo:hi] = torch.tensor(group_sources, dtype=torch.long, device=device)
            if diversity_penalty > 0.0:
                picked_so_far.scatter_add_(1, chosen, torch.ones_like(chosen))

        beam_scores = next_scores
        order = source_rows.view(-1)
        sequences = torch.cat([sequences[order], next_tokens.view(-1, 1)], dim=-1)
        if all(all(row) for row in done) or sequences.shape[1] >= max_length:
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        cache.reorder_cache(order)
        step_ids = sequences[:, -1:]
    return _select(sequences, beam_scores, finished, done, num_return_sequences, prompt_len, max_length, pad, eos)


def _select(
    sequences: torch.Tensor,
    beam_scores: torch.Tensor,
    finished: list[list[_FinishedHypotheses]],
    done: list[list[bool]],
    num_return: int,
    prompt_len: int,
    max_length: int,
    pad: int | None,
    eos: list[int],
) -> torch.Tensor:
    """Close the open beams, pick the best `num_return` hypotheses per prompt, pad them into one tensor."""
    batch, num_groups = len(finished), len(finished[0])
    group_size = finished[0][0].size
    num_beams = num_groups * group_size
    scores = beam_scores.view(-1).tolist()
    best: list[torch.Tensor] = []
    for b in range(batch):
        for group in range(num_groups):
            if done[b][group]:
                continue
            for row in range(b * num_beams + group * group_size, b * num_beams + (group + 1) * group_size):
                finished[b][group].add(sequences[row], scores[row], sequences.shape[1] - prompt_len)
        # Stable sort by score, best taken from the end: among equal scores the later-listed one wins.
        ranked = sorted((hyp for group in finished[b] for hyp in group.beams), key=lambda hyp: hyp[0])
        best.extend(ranked[-1 - j][1] for j in range(num_return))

    lengths = [len(tokens) for tokens in best]
    width = min(max(lengths) + 1, max_length)
    if min(lengths) != max(lengths):
        if pad is None:
            raise ValueError("pad_token_id is needed to pad hypotheses of different lengths")
        out = sequences.new_full((len(best), width), pad)
    else:
        out = sequences.new_empty((len(best), width))
    for i, tokens in enumerate(best):
        out[i, : len(tokens)] = tokens
        if len(tokens) < width:
            out[i, len(tokens)] = eos[0]
    return out
