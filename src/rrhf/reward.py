"""Reward scorers: one small interface, `score(prompts, responses) -> list[float]`.

- `vader`: the offline sentiment of the continuation (the embedded default).
- `gptj_rm_static`: Dahoas/gptj-rm-static, the paper's HH reward model, as paper-notes section 5 describes.
- `sequence_classifier`: any Hugging Face sequence-classification model (the IMDB appendix uses the
  positive-class probability of lvwerra/distilbert-imdb).

Model-based scorers run batches of texts sorted by length, so little compute goes to padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn


class Scorer(Protocol):
    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _scored_in_batches(texts: list[str], lengths: Sequence[int], batch_size: int,
                       score_batch: Callable[[list[str]], list[float]], *, sort: bool = True) -> list[float]:
    scores = [0.0] * len(texts)
    in_order = [list(range(i, min(i + batch_size, len(texts)))) for i in range(0, len(texts), batch_size)]
    for batch in length_sorted_batches(lengths, batch_size) if sort else in_order:
        for i, value in zip(batch, score_batch([texts[i] for i in batch])):
            scores[i] = float(value)
    return scores


class VaderScorer:
    """Sentiment of the continuation alone (VADER compound score in [-1, 1]): the offline IMDB reward."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(r)["compound"]) for r in responses]


class GPTJRewardModel(nn.Module):
    """The Dahoas reward model: a GPT-J transformer and a bias-free linear value head (hidden -> 1)."""

    def __init__(self, config) -> None:
        from transformers import GPTJModel

        super().__init__()
        self.transformer = GPTJModel(config)
        self.v_head = nn.Linear(config.n_embd, 1, bias=False)

    def forward(self, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
        # No attention mask, as the authors' scoring passes none: rows are right-padded with EOS and the
        # value is read at the first EOS, which sees no padding under the causal mask.
        hidden = self.transformer(input_ids=input_ids).last_hidden_state
        values = self.v_head(hidden).squeeze(-1)
        first_eos = (input_ids == eos_token_id).int().argmax(dim=1)
        return values.gather(1, first_eos[:, None]).squeeze(1)

    @classmethod
    def from_checkpoint(cls, config, checkpoint: str, dtype: torch.dtype = torch.float32) -> GPTJRewardModel:
        """Load `hf_ckpt.pt`, dropping its duplicate `model.*` keys (a second copy of the backbone)."""
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("model.")}
        model = cls(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Attention buffers (causal mask, rotary tables) are derived, and older transformers saved them.
        derived = ("attn.bias", "attn.masked_bias", "embed_positions")
        missing = [k for k in missing if not k.endswith(derived)]
        unexpected = [k for k in unexpected if not k.endswith(derived)]
        if missing or unexpected:
            raise ValueError(f"{checkpoint}: does not match GPT-J + value head "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model.to(dtype).eval()


class GPTJRMScorer:
    """Dahoas/gptj-rm-static: text `prompt + separator + response + eos`, gpt2 tokenizer, left truncation.

    The separator is a space in the authors' scoring script; trlX's PPO joins with nothing (paper-notes
    sections 5 and 7).
    """

    def __init__(self, model: GPTJRewardModel, tokenizer, *, max_length: int = 1024, batch_size: int = 8,
                 device: str = "cpu", separator: str = " ") -> None:
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.truncation_side = "left"
        tokenizer.padding_side = "right"
        self.model, self.tokenizer = model.to(device), tokenizer
        self.max_length, self.batch_size, self.device = max_length, batch_size, device
        self.separator = separator

    @classmethod
    def from_config(cls, cfg: Any) -> GPTJRMScorer:
        from huggingface_hub import hf_hub_download
        from transformers import AutoConfig, AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32  # fp16 as the authors, on a GPU
        checkpoint = hf_hub_download(cfg.checkpoint_repo, cfg.checkpoint_file)
        model = GPTJRewardModel.from_checkpoint(AutoConfig.from_pretrained(cfg.backbone), checkpoint, dtype)
        return cls(model, AutoTokenizer.from_pretrained(cfg.tokenizer), max_length=cfg.max_length,
                   batch_size=cfg.batch_size, device=device, separator=cfg.get("separator", " "))

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        eos = self.tokenizer.eos_token
        texts = [f"{p}{self.separator}{r}{eos}" for p, r in zip(prompts, responses)]

        @torch.no_grad()
        def score_batch(batch: list[str]) -> list[float]:
            ids = self.tokenizer(batch, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt").input_ids.to(self.device)
            return self.model(ids, self.tokenizer.eos_token_id).float().tolist()

        return _scored_in_batches(texts, [len(t) for t in texts], self.batch_size, score_batch)


class SequenceClassifierScorer:
    """Probability (or logit) of one label of a sequence-classification model, e.g. IMDB's positive."""

    def __init__(self, model, tokenizer, *, label: int = 1, output: str = "prob", text: str = "response",
                 max_length: int = 512, batch_size: int = 32, sort_by_length: bool = True, separator: str = "",
                 truncation_side: str | None = None) -> None:
        if output not in ("prob", "logit") or text not in ("response", "prompt+response"):
            raise ValueError(f"reward: output must be prob|logit and text response|prompt+response, "
                             f"got output={output!r} text={text!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        if truncation_side is not None:  # RL4LMs cuts a long review from the left (paper-notes section 8)
            tokenizer.truncation_side = truncation_side
        self.label, self.output, self.text, self.separator = label, output, text, separator
        self.max_length, self.batch_size, self.sort_by_length = max_length, batch_size, sort_by_length

    @classmethod
    def from_config(cls, cfg: Any) -> SequenceClassifierScorer:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(cfg.path)
        return cls(model, AutoTokenizer.from_pretrained(cfg.path), label=cfg.label, output=cfg.output,
                   text=cfg.text, max_length=cfg.max_length, batch_size=cfg.batch_size,
                   separator=cfg.get("separator", ""), truncation_side=cfg.get("truncation_side"))

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = responses if self.text == "response" else [p + self.separator + r for p, r in zip(prompts, responses)]

        @torch.no_grad()
        def score_batch(batch: list[str]) -> list[float]:
            enc = self.tokenizer(batch, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
            logits = self.model(**enc).logits.float()
            values = logits.softmax(-1) if self.output == "prob" else logits
            return values[:, self.label].tolist()

        return _scored_in_batches(texts, [len(t) for t in texts], self.batch_size, score_batch,
                                  sort=self.sort_by_length)


def score_groups(scorer: Scorer, prompts: Sequence[str], groups: Sequence[Sequence[str]]) -> list[list[float]]:
    """Scores of every prompt's group of responses, from one scorer call over all of them."""
    flat = scorer.score([p for p, g in zip(prompts, groups) for _ in g], [r for g in groups for r in g])
    out, at = [], 0
    for g in groups:
        out.append(list(flat[at:at + len(g)]))
        at += len(g)
    return out


def build_scorer(cfg: Any) -> Scorer:
    """The scorer a `reward` config names."""
    if cfg.name == "vader":
        return VaderScorer()
    if cfg.name == "gptj_rm_static":
        return GPTJRMScorer.from_config(cfg)
    if cfg.name == "sequence_classifier":
        return SequenceClassifierScorer.from_config(cfg)
    raise ValueError(f"reward.name={cfg.name!r}: unknown reward; known: vader, gptj_rm_static, "
                     "sequence_classifier")
