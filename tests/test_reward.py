"""Reward scorers: the Dahoas GPT-J reward model layout, a sequence classifier, VADER, batching."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPTJConfig,
    GPTJModel,
    PreTrainedTokenizerFast,
)

from rrhf.reward import (
    GPTJRewardModel,
    GPTJRMScorer,
    SequenceClassifierScorer,
    VaderScorer,
    length_sorted_batches,
)

WORDS = "<|endoftext|> the film was great awful plot acting Human: Assistant: a b c d e f g h".split()


def _tokenizer(**specials) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS + ["[UNK]"])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **specials)


@pytest.fixture
def rm_checkpoint(tmp_path: Path) -> tuple[GPTJConfig, Path]:
    """A tiny random GPT-J reward model saved as the authors' hf_ckpt.pt: duplicate `model.*` keys,
    a value head, and the attention buffers older transformers versions stored."""
    torch.manual_seed(0)
    config = GPTJConfig(
        vocab_size=len(WORDS) + 1,
        n_embd=16,
        n_layer=2,
        n_head=2,
        rotary_dim=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    backbone, head = GPTJModel(config), torch.nn.Linear(16, 1, bias=False)
    state = {f"transformer.{k}": v for k, v in backbone.state_dict().items()}
    state |= {f"model.transformer.{k}": torch.randn_like(v) for k, v in backbone.state_dict().items()}
    state |= {
        "model.lm_head.weight": torch.randn(len(WORDS) + 1, 16),
        "v_head.weight": head.weight.detach(),
        "transformer.h.0.attn.bias": torch.ones(1, 1, 64, 64, dtype=torch.bool),
    }
    torch.save(state, tmp_path / "hf_ckpt.pt")
    return config, tmp_path / "hf_ckpt.pt"


def test_gptj_rm_value_at_first_eos(rm_checkpoint) -> None:
    config, checkpoint = rm_checkpoint
    tokenizer = _tokenizer(eos_token="<|endoftext|>")
    scorer = GPTJRMScorer(GPTJRewardModel.from_checkpoint(config, str(checkpoint)), tokenizer, batch_size=2)
    prompts, responses = ["Human: the film", "Human: a b c d e f Assistant:"], ["was great", "awful"]
    got = scorer.score(prompts, responses)

    # Independent computation from the raw checkpoint: backbone from the non-duplicate keys, one text
    # at a time without padding, the head's value at the single EOS at the end of the text.
    state = torch.load(checkpoint, weights_only=True)
    backbone = GPTJModel(config)
    backbone.load_state_dict(
        {
            k[len("transformer.") :]: v
            for k, v in state.items()
            if k.startswith("transformer.") and not k.endswith("attn.bias")
        },
        strict=False,
    )
    for prompt, response, value in zip(prompts, responses, got):
        ids = tokenizer(
            f"{prompt} {response}<|endoftext|>".replace("<|endoftext|>", " <|endoftext|>"), return_tensors="pt"
        ).input_ids
        assert ids[0, -1] == 0
        with torch.no_grad():
            hidden = backbone(input_ids=ids).last_hidden_state[0, -1]
        assert value == pytest.approx(float(hidden @ state["v_head.weight"][0]), abs=1e-5)


def test_gptj_rm_rejects_a_foreign_checkpoint(tmp_path: Path, rm_checkpoint) -> None:
    config, _ = rm_checkpoint
    torch.save({"v_head.weight": torch.zeros(1, 16)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        GPTJRewardModel.from_checkpoint(config, str(tmp_path / "bad.pt"))


def test_gptj_rm_truncates_on_the_left(rm_checkpoint) -> None:
    config, checkpoint = rm_checkpoint
    scorer = GPTJRMScorer(
        GPTJRewardModel.from_checkpoint(config, str(checkpoint)), _tokenizer(eos_token="<|endoftext|>"), max_length=6
    )
    long_prompt = " ".join(["a b c d"] * 10)
    # Left truncation keeps the response and its EOS; the value is read there.
    assert scorer.score([long_prompt], ["great"]) == scorer.score(["a b c d"], ["great"])


def test_gptj_rm_joins_with_its_separator(rm_checkpoint) -> None:
    # The authors' scoring joins prompt and response with a space; trlX's PPO joins them with nothing.
    config, checkpoint = rm_checkpoint
    model = GPTJRewardModel.from_checkpoint(config, str(checkpoint))
    spaced = GPTJRMScorer(model, _tokenizer(eos_token="<|endoftext|>"))
    joined = GPTJRMScorer(model, _tokenizer(eos_token="<|endoftext|>"), separator="")
    assert joined.score(["Human: the film "], ["was great"]) == spaced.score(["Human: the film"], ["was great"])
    assert joined.score(["Human: the film"], ["was great"]) != spaced.score(["Human: the film"], ["was great"])


def test_sequence_classifier_scores_prompt_and_response_as_rl4lms() -> None:
    # RL4LMs' IMDB reward: the classifier reads prompt + generation, joined as they are, cut from the left.
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=len(WORDS) + 2, dim=16, hidden_dim=32, n_layers=1, n_heads=2, num_labels=2, pad_token_id=0
        )
    )
    tokenizer = _tokenizer(pad_token="<|endoftext|>")
    scorer = SequenceClassifierScorer(model, tokenizer, text="prompt+response", max_length=4, truncation_side="left")
    got = scorer.score(["a b c d the film", "the"], [" was great", " plot"])
    with torch.no_grad():
        tail = model(**tokenizer("the film was great", return_tensors="pt")).logits[0].softmax(-1)[1]
        short = model(**tokenizer("the plot", return_tensors="pt")).logits[0].softmax(-1)[1]
    assert got == pytest.approx([float(tail), float(short)], abs=1e-5)


def test_sequence_classifier_probability_of_the_label() -> None:
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=len(WORDS) + 2, dim=16, hidden_dim=32, n_layers=1, n_heads=2, num_labels=2, pad_token_id=0
        )
    )
    tokenizer = _tokenizer(pad_token="<|endoftext|>")
    scorer = SequenceClassifierScorer(model, tokenizer, label=1, batch_size=2)
    texts = ["the film was great", "awful", "the plot a b c"]
    got = scorer.score(["x"] * 3, texts)
    for text, value in zip(texts, got):
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
        assert value == pytest.approx(float(logits.softmax(-1)[1]), abs=1e-5)


def test_vader_scores_the_continuation() -> None:
    scores = VaderScorer().score(["A terrible, awful opening."] * 2, [" It was wonderful and moving.", " Dull."])
    assert scores[0] > 0.3 and scores[1] <= 0


def test_length_sorted_batches_cover_every_index_once() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8]
    batches = length_sorted_batches(lengths, 3, longest_first=True)
    assert sorted(i for b in batches for i in b) == list(range(7))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True) and all(len(b) <= 3 for b in batches)
