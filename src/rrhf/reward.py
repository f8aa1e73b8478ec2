"""Reward scorers: `score(prompts, responses) -> list[float]`, computed batch by batch.

- `vader`: the offline sentiment of the continuation (the embedded default).
- `gptj_rm_static`: Dahoas/gptj-rm-static, the paper's HH reward model (paper-notes section 5).
- `sequence_classifier`: any Hugging Face sequence-classification model (the IMDB appendix uses the
  positive-class probability of lvwerra/distilbert-imdb).

A scorer turns each (prompt, response) into the text it scores, forms its batches (model scorers: texts of
similar length together, so little compute goes to padding) and scores one batch at a time, so a stage can
divide the batches among ranks (`score_in_shards`) and get the same numbers as one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rrhf import hub
from rrhf.placement import Placement
from rrhf.sharding import length_sorted_batches, map_batches


class Scorer:
    """Base of the scorers: texts, batches, one batch's scores; `score` runs them all in this process."""

    batch_size: int = 1024
    sort_by_length: bool = False

    def texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        return list(responses)

    def score_texts(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def batches(self, texts: Sequence[str]) -> list[list[int]]:
        """Indices of `texts` in the batches this scorer runs (longest first, so memory peaks at once)."""
        if self.sort_by_length:
            return length_sorted_batches([len(t) for t in texts], self.batch_size, longest_first=True)
        return [list(range(i, min(i + self.batch_size, len(texts)))) for i in range(0, len(texts), self.batch_size)]

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        texts = self.texts(prompts, responses)
        scores = [0.0] * len(texts)
        for batch in self.batches(texts):
            for i, value in zip(batch, self.score_texts([texts[i] for i in batch])):
                scores[i] = float(value)
        return scores


class VaderScorer(Scorer):
    """Sentiment of the continuation alone (VADER compound score in [-1, 1]): the offline IMDB reward."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score_texts(self, texts: list[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(t)["compound"]) for t in texts]


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
            raise ValueError(
                f"{checkpoint}: does not match GPT-J + value head (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        return model.to(dtype).eval()


class GPTJRMScorer(Scorer):
    """Dahoas/gptj-rm-static: text `prompt + separator + response + eos`, gpt2 tokenizer, left truncation.

    The separator is a space in the authors' scoring script; trlX's PPO joins with nothing (paper-notes
    sections 5 and 7).
    """

    sort_by_length = True

    def __init__(
        self,
        model: GPTJRewardModel,
        tokenizer,
        *,
        max_length: int = 1024,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        separator: str = " ",
    ) -> None:
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.truncation_side = "left"
        tokenizer.padding_side = "right"
        self.model, self.tokenizer = model.to(device), tokenizer
        self.max_length, self.batch_size, self.device = max_length, batch_size, torch.device(device)
        self.separator = separator

    @classmethod
    def from_config(cls, cfg: Any, where: Placement) -> GPTJRMScorer:
        """The checkpoint file, the backbone's config and the tokenizer from the local Hugging Face cache, at the
        commits the run pinned (`rrhf.hub`); each of `checkpoint_repo`, `backbone`, `tokenizer` may also be a
        local folder."""
        from transformers import AutoConfig

        from rrhf.assets import load_tokenizer, resolve_model

        where_keys = (
            f"reward.checkpoint_repo={cfg.checkpoint_repo!r}, "
            f"reward.checkpoint_file={cfg.checkpoint_file!r}: the gptj-rm-static checkpoint"
        )
        try:
            checkpoint = Path(resolve_model(cfg.checkpoint_repo)) / cfg.checkpoint_file
        except hub.HubItemsMissing as error:
            raise FileNotFoundError(f"{where_keys} is not in the local cache ({error})") from None
        if not checkpoint.is_file():
            raise FileNotFoundError(
                f"reward.checkpoint_file: {checkpoint} not found ({cfg.checkpoint_repo} has no "
                f"{cfg.checkpoint_file}; reward.checkpoint_repo / reward.checkpoint_file)"
            )
        config = AutoConfig.from_pretrained(resolve_model(cfg.backbone))
        model = GPTJRewardModel.from_checkpoint(config, str(checkpoint), where.dtype)
        return cls(
            model,
            load_tokenizer(cfg.tokenizer),
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            device=where.device,
            separator=cfg.get("separator", " "),
        )

    def texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        return [f"{p}{self.separator}{r}{self.tokenizer.eos_token}" for p, r in zip(prompts, responses)]

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        ids = self.tokenizer(
            texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.model(ids, self.tokenizer.eos_token_id).float().tolist()


class SequenceClassifierScorer(Scorer):
    """Probability (or logit) of one label of a sequence-classification model, e.g. IMDB's positive."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        label: int = 1,
        output: str = "prob",
        text: str = "response",
        max_length: int = 512,
        batch_size: int = 32,
        sort_by_length: bool = True,
        separator: str = "",
        truncation_side: str | None = None,
    ) -> None:
        if output not in ("prob", "logit") or text not in ("response", "prompt+response"):
            raise ValueError(
                f"reward: output must be prob|logit and text response|prompt+response, "
                f"got output={output!r} text={text!r}"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        if truncation_side is not None:  # RL4LMs cuts a long review from the left (paper-notes section 8)
            tokenizer.truncation_side = truncation_side
        self.label, self.output, self.text, self.separator = label, output, text, separator
        self.max_length, self.batch_size, self.sort_by_length = max_length, batch_size, sort_by_length

    @classmethod
    def from_config(cls, cfg: Any, where: Placement) -> SequenceClassifierScorer:
        from transformers import AutoModelForSequenceClassification

        from rrhf.assets import load_tokenizer, resolve_model

        folder = resolve_model(cfg.path)
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=where.dtype).to(where.device)
        return cls(
            model,
            load_tokenizer(cfg.path),
            label=cfg.label,
            output=cfg.output,
            text=cfg.text,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            separator=cfg.get("separator", ""),
            truncation_side=cfg.get("truncation_side"),
        )

    def texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        if self.text == "response":
            return list(responses)
        return [p + self.separator + r for p, r in zip(prompts, responses)]

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits.float()
        values = logits.softmax(-1) if self.output == "prob" else logits
        return values[:, self.label].tolist()


def score_in_shards(
    scorer: Scorer,
    prompts: Sequence[str],
    responses: Sequence[str],
    work: Path,
    name: str,
    *,
    desc: str = "scoring",
    crash_stage: str | None = None,
) -> list[float]:
    """`scorer.score`, the batches divided among the ranks of a launch (`rrhf.sharding.map_batches`)."""
    texts = scorer.texts(prompts, responses)
    results = map_batches(
        work,
        name,
        scorer.batches(texts),
        lambda batch: [float(v) for v in scorer.score_texts([texts[i] for i in batch])],
        desc=desc,
        unit="response",
        crash_stage=crash_stage,
    )
    return [results[i] for i in range(len(texts))]


def score_groups(
    scorer: Scorer,
    prompts: Sequence[str],
    groups: Sequence[Sequence[str]],
    *,
    score: Callable[[list[str], list[str]], Sequence[float]] | None = None,
) -> list[list[float]]:
    """Scores of every prompt's group of responses, from one call over all of them: `score(prompts, responses)`,
    the scorer's own `score` unless given (the score stage passes `score_in_shards`)."""
    flat = (score or scorer.score)([p for p, g in zip(prompts, groups) for _ in g], [r for g in groups for r in g])
    out, at = [], 0
    for g in groups:
        out.append(list(flat[at : at + len(g)]))
        at += len(g)
    return out


def build_scorer(cfg: Any, where: Placement | None = None) -> Scorer:
    """The scorer a `reward` config names, its model (if any) placed as `where` says (default: CPU, fp32)."""
    where = where or Placement(torch.device("cpu"), torch.float32)
    if cfg.name == "vader":
        return VaderScorer()
    if cfg.name == "gptj_rm_static":
        return GPTJRMScorer.from_config(cfg, where)
    if cfg.name == "sequence_classifier":
        return SequenceClassifierScorer.from_config(cfg, where)
    raise ValueError(f"reward.name={cfg.name!r}: unknown reward; known: vader, gptj_rm_static, sequence_classifier")
