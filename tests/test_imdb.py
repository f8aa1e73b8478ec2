"""The IMDB appendix as RL4LMs defines its task (issue 14 item 8): the prompt builder and the policy's
perplexity on the reference reviews."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import rrhf.data
from rrhf.data import imdb_prefix_rows
from rrhf.evaluation import reference_perplexity

TRAIN = [f"review {i} " + " ".join(f"w{i}_{j}" for j in range(i + 3)) for i in range(10)]
TEST = [f"test {i} was a fine film overall" for i in range(6)]


@pytest.fixture
def fake_hub(monkeypatch):
    splits = {"train": [{"text": t, "label": 1} for t in TRAIN], "test": [{"text": t, "label": 0} for t in TEST]}
    monkeypatch.setattr(rrhf.data, "hub_rows", lambda name, split: splits[split])


def test_rl4lms_prompts_are_the_first_half_of_the_words(fake_hub) -> None:
    rows = imdb_prefix_rows("imdb", "train")
    # RL4LMs: the training reviews shuffled with seed 42 (datasets' shuffle draws numpy's default_rng), the
    # first 80% kept for training.
    order = np.random.default_rng(42).permutation(len(TRAIN))[:8]
    assert [r["reference"] for r in rows] == [TRAIN[i] for i in order]
    for row in rows:
        words = row["reference"].split(" ")
        assert row["prompt"] == " ".join(words[: len(words) // 2])
        assert row["prompt"] + row["chosen"] == row["reference"] and row["chosen"].startswith(" ")
        assert row["rejected"] is None
    test = imdb_prefix_rows("imdb", "test", limit=5)  # test_size: the first 5,000 of the shuffled test split
    assert [r["reference"] for r in test] == [TEST[i] for i in np.random.default_rng(42).permutation(6)[:5]]
    assert test[0]["prompt"] == " ".join(test[0]["reference"].split(" ")[:3])
    with pytest.raises(ValueError, match="rule"):
        imdb_prefix_rows("imdb", "train", rule="halves")


WORDS = ["<|endoftext|>", "\n\n"] + "the film was a fine great awful plot very long".split()


@pytest.fixture(scope="module")
def gpt2():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n\n", behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(WORDS), n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    return model.eval(), tokenizer


def _nll(model, context: list[int], token: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1]
    return -float(logits.log_softmax(-1)[token])


def test_reference_perplexity_is_rl4lms_sliding_window(gpt2) -> None:
    model, tokenizer = gpt2
    texts = ["the film was a fine film", "a very long plot", "the plot was awful"]
    ids = tokenizer("\n\n".join(texts)).input_ids
    assert len(ids) == 16 and ids[6] == WORDS.index("\n\n")
    # One window over a text that fits: exp of the mean NLL of every token after the first, times n / n.
    one = tokenizer(texts[0]).input_ids
    nll = [_nll(model, one[:t], one[t]) for t in range(1, len(one))]
    assert reference_perplexity(model, tokenizer, texts[:1]) == pytest.approx(math.exp(sum(nll) / len(nll)))
    # RL4LMs' windows (max_length 8 = n_positions, stride 4): window k scores the tokens 4k..4k+3 with up to
    # 8 tokens of context; its mean NLL is weighted by its 4 new tokens; the sum is divided by 16.
    total = 0.0
    for start in range(0, len(ids), 4):
        begin, end = max(start + 4 - 8, 0), min(start + 4, len(ids))
        scored = [t for t in range(start, end) if t > begin]
        mean = sum(_nll(model, ids[begin:t], ids[t]) for t in scored) / len(scored)
        total += mean * (end - start)
    assert reference_perplexity(model, tokenizer, texts, stride=4) == pytest.approx(math.exp(total / len(ids)))
