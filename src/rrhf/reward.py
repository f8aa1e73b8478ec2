"""Reward scorers: `score(prompts, responses) -> list[float]`, computed batch by batch.

- `vader`: the offline sentiment of the continuation (the embedded default).
- `gptj_rm_static`: Dahoas/gptj-rm-static, the paper's HH reward model (paper-notes section 5).
- `sequence_classifier`: any Hugging Face sequence-classification model (the IMDB appendix uses the
  positive-class probability of lvwerra/distilbert-imdb).
- `llm_judge`: Wombat's reward, an LLM behind an OpenAI-compatible endpoint rating relevance, correctness,
  coherence and safety (`LLMJudgeScorer`, `rrhf.judging.aspects`). The one scorer that can fail on an item (an
  answer it cannot read): that item's score is NaN, and its shard record says why.

A scorer turns each (prompt, response) into the text it scores, forms its batches (model scorers: texts of
similar length together, so little compute goes to padding) and scores one batch at a time, so a stage can
divide the batches among ranks (`score_in_shards`) and get the same numbers as one process. What a shard keeps of a
batch is the scorer's `score_records`: the scores themselves, or for the LLM judge a record per item (its ratings,
raw answers, failure) that the score stage writes beside the training file (`records_in_shards`).
"""

from __future__ import annotations

import contextlib
import json
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rrhf import hub
from rrhf.placement import Placement
from rrhf.sharding import length_sorted_batches, map_batches

if TYPE_CHECKING:
    from rrhf.judging.aspects import AspectJudgement
    from rrhf.judging.client import ChatClient, ChatRequest


class Scorer:
    """Base of the scorers: texts, batches, one batch's scores; `score` runs them all in this process."""

    batch_size: int = 1024
    sort_by_length: bool = False

    def texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        return list(responses)

    def score_texts(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def score_records(self, texts: list[str]) -> list[Any]:
        """What a stage's shard keeps of one batch, one JSON value per text (`record_score` reads its score): the
        scores themselves here; a scorer with more to keep returns a mapping per text with its `score`."""
        return [float(v) for v in self.score_texts(texts)]

    def close(self) -> None:
        """Release what the scorer holds beyond memory (the LLM judge's local server); nothing here."""

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


class LLMJudgeScorer(Scorer):
    """Wombat's reward (`rrhf.judging.aspects`): an LLM rates each (prompt, response) on relevance, correctness,
    coherence and safety in one request; the reward is their mean or weighted mean, NaN when no answer could be
    read (a recorded failure, never a 0 that would rank the candidate last).

    A text is the (prompt, response) pair as a JSON array: the stages hand a scorer strings (`texts`, `batches`,
    `score_texts`), and the judge needs both halves. A batch's requests run concurrently (`concurrency` at once,
    each judgement's follow-ups in its own thread), with a progress bar whose postfix counts the failures so far.

    `client` carries the cache and the parameters every request is keyed by. Without `serve` it is the endpoint.
    With `serve` (a local model: `reward.base_url` null) it reaches nothing and only reads the cache; `serve(stack)`
    starts the local server on the first judgement the cache cannot give and returns a client for it with the same
    model identity and parameters (so the same keys), its lifetime in `stack`, which `close` ends. A rerun whose
    answers are all cached starts no server and sends nothing.

    A request that fails for good (the client's retries spent) raises its EndpointError once the requests in
    flight have ended (their answers are cached; those not started are dropped): an endpoint that is down fails
    the stage, and a rerun asks only what is missing, rather than recording an outage as bad candidates.
    """

    def __init__(
        self,
        client: ChatClient,
        *,
        serve: Callable[[contextlib.ExitStack], ChatClient] | None = None,
        weights: Mapping[str, float] | None = None,
        reasks: int = 1,
        concurrency: int = 1,
        batch_size: int = 64,
        progress: bool = True,
        template: str = "wombat_aspects",
    ) -> None:
        from rrhf.judging.aspects import check_weights, template_named

        self.client, self._serve = client, serve
        self.template = template_named(template)
        self.weights = check_weights(weights)
        self.reasks, self.concurrency, self.batch_size = reasks, max(1, concurrency), batch_size
        self.progress = progress
        self.judged = self.failed = self.reasked = 0  # this process's judgements that needed the endpoint
        self._stack = contextlib.ExitStack()
        self._stack.callback(client.close)
        # A scorer dropped without `close` (evaluation builds one per stage) still stops its server.
        self._finalizer = weakref.finalize(self, self._stack.close)

    @classmethod
    def from_config(cls, cfg: Any) -> LLMJudgeScorer:
        """conf/reward/llm_judge.yaml: a hosted or served endpoint at `base_url`, or (null) the local model
        `model` served on 127.0.0.1 when first needed; answers cached in `cache` ($RRHF_CACHE/judge_cache)."""
        from rrhf.assets import cache_root
        from rrhf.judging.aspects import template_named
        from rrhf.judging.cache import JudgeCache
        from rrhf.judging.client import ChatClient
        from rrhf.judging.server import cache_client, local_server

        settings: dict[str, Any] = {
            "cache": JudgeCache(cfg.get("cache") or cache_root() / "judge_cache"),
            "temperature": float(cfg.temperature),
            "max_tokens": cfg.get("max_tokens") or template_named(cfg.get("template", "wombat_aspects")).max_tokens,
            "max_retries": int(cfg.retries),
        }
        weights = cfg.get("weights")
        options: dict[str, Any] = {
            "weights": dict(weights) if weights is not None else None,
            "reasks": int(cfg.reasks),
            "template": str(cfg.get("template", "wombat_aspects")),
            "concurrency": int(cfg.concurrency),
            "batch_size": int(cfg.batch_size),
        }
        if cfg.get("base_url"):
            return cls(ChatClient(cfg.base_url, cfg.model, api_key_env=cfg.get("api_key_env"), **settings), **options)

        def serve(stack: contextlib.ExitStack) -> ChatClient:
            server = stack.enter_context(local_server(cfg.model, threads=cfg.get("threads"), device=cfg.device))
            return stack.enter_context(server.client(**settings))

        return cls(cache_client(cfg.model, **settings), serve=serve, **options)

    def texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        return [json.dumps([p, r], ensure_ascii=False) for p, r in zip(prompts, responses)]

    def score_texts(self, texts: list[str]) -> list[float]:
        return [record_score(r) for r in self.score_records(texts)]

    def score_records(self, texts: list[str]) -> list[dict[str, Any]]:
        """Each pair's `AspectJudgement.to_dict()`: score (None when failed), ratings, failure, raw answers."""
        return [j.to_dict() for j in self.judge([tuple(json.loads(t)) for t in texts])]

    def judge(self, pairs: Sequence[tuple[str, str]]) -> list[AspectJudgement]:
        """The judgement of every (prompt, response): first what the cache holds, then the rest from the endpoint."""
        from rrhf.judging.aspects import judge_pair

        options = {"template": self.template, "reasks": self.reasks, "weights": self.weights}
        found = [judge_pair(p, r, self._cached, **options) for p, r in pairs]
        left = [i for i, j in enumerate(found) if j is None]
        if left:
            if self._serve is not None:
                # From this (the stage's) thread: the server is tied to the thread that starts it (`local_server`).
                self.client, self._serve = self._serve(self._stack), None
            for i, judgement in zip(left, self._ask([pairs[i] for i in left], options)):
                found[i] = judgement
        return found  # type: ignore[return-value]  (every None was filled)

    def _cached(self, request: ChatRequest) -> str | None:
        cache = self.client.cache
        answer = cache.get(self.client.key(request)) if cache is not None else None
        return None if answer is None else answer["content"]

    def _ask(self, pairs: Sequence[tuple[str, str]], options: dict[str, Any]) -> list[AspectJudgement]:
        from tqdm.auto import tqdm

        from rrhf.judging.aspects import judge_pair

        def answer(request: ChatRequest) -> str:
            return self.client.complete_request(request).content

        out: list[Any] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc="llm judge", unit="judgement", disable=not self.progress, leave=False)
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="llm-judge")
        try:
            pending: dict[Future[Any], int] = {
                pool.submit(judge_pair, p, r, answer, **options): i for i, (p, r) in enumerate(pairs)
            }
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    judgement = future.result()  # an EndpointError ends the batch here
                    out[pending.pop(future)] = judgement
                    self.judged += 1
                    self.failed += judgement.failed
                    self.reasked += len(judgement.answers) - 1
                    bar.update(1)
                    bar.set_postfix(failed=self.failed, reasked=self.reasked, refresh=False)
        finally:
            # Those in flight finish (bounded by their retries) so that their answers are cached for the rerun.
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return out

    def close(self) -> None:
        self._finalizer()


def record_score(record: Any) -> float:
    """The score in a shard record (`Scorer.score_records`): the number itself, or a mapping's `score`; None, a
    failed judgement (JSON has no NaN), is NaN."""
    value = record.get("score") if isinstance(record, Mapping) else record
    return math.nan if value is None else float(value)


def records_in_shards(
    scorer: Scorer,
    prompts: Sequence[str],
    responses: Sequence[str],
    work: Path,
    name: str,
    *,
    desc: str = "scoring",
    crash_stage: str | None = None,
) -> list[Any]:
    """Every item's `scorer.score_records` value, the batches divided among the ranks of a launch
    (`rrhf.sharding.map_batches`)."""
    texts = scorer.texts(prompts, responses)
    results = map_batches(
        work,
        name,
        scorer.batches(texts),
        lambda batch: scorer.score_records([texts[i] for i in batch]),
        desc=desc,
        unit="response",
        crash_stage=crash_stage,
    )
    return [results[i] for i in range(len(texts))]


def score_in_shards(
    scorer: Scorer, prompts: Sequence[str], responses: Sequence[str], *args: Any, **kwargs: Any
) -> list[float]:
    """`scorer.score`, the batches divided among the ranks of a launch: `records_in_shards` (same arguments) read
    as scores; NaN for an item the scorer recorded as failed."""
    return [record_score(r) for r in records_in_shards(scorer, prompts, responses, *args, **kwargs)]


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
    if cfg.name == "llm_judge":
        return LLMJudgeScorer.from_config(cfg)
    raise ValueError(
        f"reward.name={cfg.name!r}: unknown reward; known: vader, gptj_rm_static, sequence_classifier, llm_judge"
    )
