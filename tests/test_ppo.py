"""PPO (rrhf.ppo): its pieces against hand-computed numbers, then training on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rrhf.generation import trlx_stop_cut
from rrhf.ppo import (
    AdaptiveKLController,
    PPOConfig,
    RunningMoments,
    _round_kl,
    controller_kl,
    freeze_bottom_layers,
    gae,
    ppo_loss,
    response_tokens,
    train_ppo,
    update_schedule,
    whiten,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and on a busy 2-core machine spinning OpenMP workers
    # slow these tests down a hundredfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gae_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.0, 9.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.2, 0.4, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 2 has two tokens; its third entry is padding

    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 1, from the end: delta_t = r_t + gamma * V_{t+1} - V_t (V_3 = 0), A_t = delta_t + gamma * lam * A_{t+1}.
    # t=2: 1.0 + 0 - 0.6 = 0.4          -> A = 0.4
    # t=1: 0.5 + 0.6 - 0.4 = 0.7        -> A = 0.7 + 0.95 * 0.4 = 1.08
    # t=0: 0.0 + 0.4 - 0.2 = 0.2        -> A = 0.2 + 0.95 * 1.08 = 1.226
    # Row 2 ends at t=1, so its padded value and reward count for nothing:
    # t=1: 1.0 + 0 - 0.4 = 0.6          -> A = 0.6
    # t=0: 0.0 + 0.4 - 0.2 = 0.2        -> A = 0.2 + 0.95 * 0.6 = 0.77
    assert torch.allclose(advantages, torch.tensor([[1.226, 1.08, 0.4], [0.77, 0.6, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[1.426, 1.48, 1.0], [0.97, 1.0, 0.0]]))

    advantages, returns = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.5)
    # t=2: 1.0 + 0.9 * 0 - 0.6 = 0.4    -> A = 0.4
    # t=1: 0.5 + 0.9 * 0.6 - 0.4 = 0.64 -> A = 0.64 + 0.45 * 0.4 = 0.82
    # t=0: 0.0 + 0.9 * 0.4 - 0.2 = 0.16 -> A = 0.16 + 0.45 * 0.82 = 0.529
    assert torch.allclose(advantages, torch.tensor([[0.529, 0.82, 0.4]]))
    assert torch.allclose(returns, torch.tensor([[0.729, 1.22, 1.0]]))


def test_adaptive_kl_controller() -> None:
    kl = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    kl.update(6.6, n_steps=4)  # 10% above target: coef *= 1 + 0.1 * 4 / 10000
    assert kl.value == pytest.approx(0.05 * (1 + 0.1 * 4 / 10000))
    before = kl.value
    kl.update(60.0, n_steps=4)  # far above: the error clips at +0.2
    assert kl.value == pytest.approx(before * (1 + 0.2 * 4 / 10000))
    before = kl.value
    kl.update(0.0, n_steps=4)  # far below: clips at -0.2
    assert kl.value == pytest.approx(before * (1 - 0.2 * 4 / 10000))

    fixed = AdaptiveKLController(0.05, target=None, horizon=10000)
    fixed.update(60.0, n_steps=4)
    assert fixed.value == 0.05


def test_running_moments_match_numpy() -> None:
    moments = RunningMoments()
    seen: list[float] = []
    for batch in ([1.0, 2.0, 3.0], [10.0], [4.0, 5.0, 6.0, 7.0, -1.0], [0.5, 0.25]):
        moments.update(batch)
        seen += batch
        assert moments.mean == pytest.approx(np.mean(seen))
        assert moments.std == pytest.approx(np.std(seen, ddof=1))


def test_ppo_loss_gradients_and_value_clipping() -> None:
    advantages = torch.tensor([[1.0, -2.0, 0.5], [3.0, 7.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    old = torch.zeros(2, 3)
    zeros = torch.zeros(2, 3)

    def pg_grad(logprobs: torch.Tensor) -> torch.Tensor:
        logprobs = logprobs.clone().requires_grad_(True)
        loss, _ = ppo_loss(
            logprobs, zeros, old, zeros, advantages, zeros, mask, cliprange=0.2, cliprange_value=0.2, vf_coef=1.0
        )
        loss.backward()
        return logprobs.grad

    # At ratio 1, d loss / d logprob = -A / (number of unmasked tokens), and 0 on padding.
    assert torch.allclose(pg_grad(old), -advantages * mask / 4)
    # Ratio 1.5 with A > 0, ratio 0.5 with A < 0: the clipped branch is the larger loss, and flat.
    ratios = torch.where(advantages > 0, 1.5, 0.5)
    assert torch.all(pg_grad(ratios.log()) == 0)
    # Inside the clip range the gradient is -A * ratio / n again.
    assert torch.allclose(pg_grad(torch.full((2, 3), 1.1).log()), -advantages * 1.1 * mask / 4)

    def vf_loss(value: float, old_value: float, ret: float) -> float:
        one = torch.ones(1, 1)
        _, stats = ppo_loss(
            0 * one,
            value * one,
            0 * one,
            old_value * one,
            0 * one,
            ret * one,
            one,
            cliprange=0.2,
            cliprange_value=0.2,
            vf_coef=1.0,
        )
        return stats["vf_loss"]

    # V = 2 moved far from V_old = 0 onto R = 2: clipped to 0.2, whose error (1.8^2) is the larger.
    assert vf_loss(2.0, 0.0, 2.0) == pytest.approx(0.5 * 1.8**2)
    # V = -1 lands on R = -1 but clipping stops at -0.2: the clipped error 0.8^2 counts.
    assert vf_loss(-1.0, 0.0, -1.0) == pytest.approx(0.5 * 0.8**2)
    # V = 1 overshoots R = 0.1 from V_old = 0: the unclipped error 0.9^2 beats the clipped 0.1^2.
    assert vf_loss(1.0, 0.0, 0.1) == pytest.approx(0.5 * 0.9**2)


class _CharTokenizer:
    """One token per character, EOS = 0: enough to check how a response is cut."""

    eos_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != self.eos_token_id)

    def __call__(self, text: str, add_special_tokens: bool = True):
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()


def _chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_trlx_stop_rule() -> None:
    # trlX (ppo_hh at v0.6.0): "Human:" / "Assistant:" and their lower case anywhere, cut, right-strip only.
    assert trlx_stop_cut(" nice film\n\nHuman: and more") == (" nice film", True)
    assert trlx_stop_cut(" I told the Human: no") == (" I told the", True)  # no blank line needed
    assert trlx_stop_cut(" ok.\nassistant: sure\nHuman: x") == (" ok.", True)
    assert trlx_stop_cut(" one human: two") == (" one", True)
    assert trlx_stop_cut(" plain answer \n") == (" plain answer \n", False)  # nothing cut, nothing stripped
    assert trlx_stop_cut("Assistant: hi") == ("", True)


def test_response_tokens_as_trlx_makes_them() -> None:
    tok = _CharTokenizer()
    kept, text = response_tokens(tok, _chars(" nice film\n\nHuman: and more"))
    assert text == " nice film" and kept == _chars(" nice film") + [0]  # cut: the text's tokens, then EOS
    kept, text = response_tokens(tok, _chars(" done") + [0, 0, 0])  # EOS, then padding
    assert (kept, text) == (_chars(" done") + [0], " done")
    kept, text = response_tokens(tok, _chars(" ran out"))  # max_new_tokens reached: no EOS
    assert (kept, text) == (_chars(" ran out"), " ran out")
    kept, text = response_tokens(tok, _chars("\n\nAssistant: hi"))  # nothing before the stop
    assert (kept, text) == ([0], "")


def test_update_order() -> None:
    rng = lambda: __import__("random").Random(7)  # noqa: E731
    # trlX v0.6.0: each minibatch gets ppo_epochs consecutive updates; the controller moves after each minibatch.
    steps = update_schedule(8, 4, 3, "minibatch", rng())
    assert len(steps) == 6
    assert steps[0][0] == steps[1][0] == steps[2][0] != steps[3][0] == steps[4][0] == steps[5][0]
    assert [move for _, move in steps] == [False, False, True, False, False, True]
    assert sorted(steps[0][0] + steps[3][0]) == list(range(8))
    # From 2023-07-31: ppo_epochs passes over all minibatches, freshly shuffled; the controller after each pass.
    steps = update_schedule(8, 4, 3, "epoch", rng())
    assert len(steps) == 6 and [move for _, move in steps] == [False, True] * 3
    for epoch in range(3):
        assert sorted(steps[2 * epoch][0] + steps[2 * epoch + 1][0]) == list(range(8))
    assert len({tuple(mb) for mb, _ in steps}) > 2  # reshuffled between passes
    with pytest.raises(ValueError, match="update_order"):
        PPOConfig(update_order="rounds")


def test_controller_kl_is_trlx_k3_estimate() -> None:
    # Two rows of log pi - log rho over every token after the first (0 = padding).
    log_ratio = torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0]])
    k3 = log_ratio.exp() - 1 - log_ratio
    # v0.6.0: the mean over the chunk's padded grid, 2 rows x (prompt width 3 + response width 2 - 1).
    assert controller_kl(log_ratio, 3, 2, "token_mean") == pytest.approx(k3.sum().item() / (2 * 4))
    # From 2023-04-20: summed over each row, averaged over rows.
    assert controller_kl(log_ratio, 3, 2, "sequence_sum") == pytest.approx(k3.sum(1).mean().item())
    # A round: v0.6.0 keeps the last chunk's value; later trlX squares the mean of the chunks' square roots.
    assert _round_kl([0.04, 0.09], "token_mean") == 0.09
    assert _round_kl([0.04, 0.09], "sequence_sum") == pytest.approx(((0.2 + 0.3) / 2) ** 2)
    assert _round_kl([], "token_mean") is None


def test_whiten_counts_the_padding_as_trlx() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])  # row 2 is one token, then padding
    values = x.flatten()
    expected = (x - values.mean()) / (values.var(unbiased=True) + 1e-8).sqrt()
    assert torch.allclose(whiten(x), expected)


def test_freeze_bottom_layers() -> None:
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        tie_word_embeddings=False,
    )
    trainable = {}
    for n in (-1, 0, 1):
        model = LlamaForCausalLM(config)
        freeze_bottom_layers(model, n)
        trainable[n] = {
            name.split(".")[2] if ".layers." in name else name.split(".")[-2]
            for name, p in model.named_parameters()
            if p.requires_grad
        }
    assert trainable[-1] == {"embed_tokens", "0", "1", "2", "norm", "lm_head"}
    assert trainable[0] == {"norm"}
    assert trainable[1] == {"2", "norm", "lm_head"}


# ---------------------------------------------------------------------------------------------------
# Training on tiny models


SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = "good bad movie film great awful plot acting was is the a very not fun dull".split()
REWARDED = ["good", "great", "fun"]
BANDIT_PROMPTS = ["the movie was", "the plot is", "a very", "the acting"]


@pytest.fixture(scope="module")
def word_model(tmp_path_factory) -> Path:
    """A random two-layer LLaMA over 20 words: a rewarded first word is sampled often enough to learn from."""
    folder = tmp_path_factory.mktemp("ppo_words")
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(SPECIALS + WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


class FirstWordScorer:
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(r.split()[:1] in [[w] for w in REWARDED]) for r in responses]


def _p_rewarded(folder: Path) -> float:
    """The model's probability that a response starts with a rewarded word, averaged over the prompts."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer.convert_tokens_to_ids(REWARDED)
    with torch.no_grad():
        return float(
            np.mean(
                [
                    model(torch.tensor([tokenizer(p).input_ids])).logits[0, -1].softmax(-1)[ids].sum()
                    for p in BANDIT_PROMPTS
                ]
            )
        )


def test_bandit_learns_the_rewarded_first_word(word_model: Path, tmp_path: Path) -> None:
    config = PPOConfig(
        iterations=4,
        num_rollouts=32,
        chunk_size=16,
        batch_size=4,
        ppo_epochs=4,
        max_new_tokens=3,
        learning_rate=3e-2,
        init_kl_coef=0.0,
        target=None,
        num_layers_unfrozen=-1,
    )
    trained = train_ppo(str(word_model), BANDIT_PROMPTS, None, FirstWordScorer(), tmp_path, config)
    before, after = _p_rewarded(word_model), _p_rewarded(trained)
    assert before < 0.2 and after > before + 0.2, (before, after)
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert [row["round"] for row in history] == [1, 2, 3, 4]
    assert all(row["kl_coef"] == 0.0 for row in history)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """`embedded:tiny` built into a private asset cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RRHF_CACHE", str(tmp_path_factory.mktemp("ppo_cache")))
        yield


class LengthScorer:
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [len(r.split()) / 4 - 0.1 * r.count("the") for r in responses]


PROMPTS = [
    "I rented this film on a whim and",
    "The plot of this movie is",
    "Honestly the acting was",
    "Every scene in the second half",
]
REFERENCES = ["it was great.", "a mess.", "superb and moving.", "drags on forever."]


def _resume_config(iterations: int) -> PPOConfig:
    return PPOConfig(
        iterations=iterations,
        num_rollouts=8,
        chunk_size=4,
        batch_size=4,
        ppo_epochs=2,
        max_new_tokens=4,
        learning_rate=1e-3,
        num_layers_unfrozen=1,
        init_kl_coef=0.5,
        target=0.1,
    )


@pytest.fixture(scope="module")
def two_rounds(tiny_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ppo_two_rounds")
    train_ppo("embedded:tiny", PROMPTS, REFERENCES, LengthScorer(), out, _resume_config(2))
    return out


def _without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_resume_matches_an_uninterrupted_run(two_rounds: Path, tmp_path: Path) -> None:
    train_ppo("embedded:tiny", PROMPTS, REFERENCES, LengthScorer(), tmp_path, _resume_config(1))
    after_one = load_file(tmp_path / "model" / "model.safetensors")
    train_ppo("embedded:tiny", PROMPTS, REFERENCES, LengthScorer(), tmp_path, _resume_config(2))

    whole, resumed = (load_file(d / "model" / "model.safetensors") for d in (two_rounds, tmp_path))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.allclose(whole[name], resumed[name], atol=1e-6), name
    assert any(not torch.equal(after_one[name], resumed[name]) for name in whole)  # round 2 did train
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert _without_time(history) == _without_time(json.loads((two_rounds / "log_history.json").read_text()))
    assert history[1]["kl_coef"] != history[0]["kl_coef"]  # the adaptive coefficient moved, and was restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "log_history.json", "model", "ppo_config.json"]
    changed = _resume_config(3)
    changed.learning_rate = 1e-4
    with pytest.raises(ValueError, match="learning_rate"):  # a resumed run keeps its settings
        train_ppo("embedded:tiny", PROMPTS, REFERENCES, LengthScorer(), tmp_path, changed)


def test_saved_model_is_a_plain_causal_lm(two_rounds: Path) -> None:
    from rrhf.assets import resolve_model

    folder = two_rounds / "model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    saved = load_file(folder / "model.safetensors")
    initial = load_file(Path(resolve_model("embedded:tiny")) / "model.safetensors")
    assert saved.keys() == initial.keys()  # no value head, nothing missing
    assert isinstance(model, LlamaForCausalLM)
    # num_layers_unfrozen=1: the bottom block and the (tied) embeddings stayed as they were.
    assert torch.equal(saved["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(saved["model.layers.1.mlp.up_proj.weight"], initial["model.layers.1.mlp.up_proj.weight"])


class RecordingScorer:
    """Scores a response by its number of words and remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.calls.append((list(prompts), list(responses)))
        return [float(len(r.split())) for r in responses]


@pytest.mark.parametrize("delta", [False, True])
def test_reward_form(word_model: Path, tmp_path: Path, delta: bool) -> None:
    # trlX v0.6.0 (the paper's PPO numbers) rewards RM(prompt + output); ppo_hh from 2023-04-10 on subtracts
    # RM(prompt + chosen). The reward model sees the prompt decoded from its tokens (no BOS: trlX adds none).
    references = ["good movie", "bad plot is not fun", "great", "the acting was very dull"]
    scorer = RecordingScorer()
    config = PPOConfig(
        iterations=1,
        num_rollouts=4,
        chunk_size=4,
        batch_size=4,
        ppo_epochs=1,
        max_new_tokens=3,
        init_kl_coef=0.0,
        target=None,
        num_layers_unfrozen=-1,
        delta_reward=delta,
    )
    train_ppo(str(word_model), BANDIT_PROMPTS, references, scorer, tmp_path, config)
    (prompts, outputs), *rest = scorer.calls
    assert sorted(prompts) == sorted(BANDIT_PROMPTS)
    row = json.loads((tmp_path / "log_history.json").read_text())[0]
    assert row["mean_score"] == pytest.approx(np.mean([len(o.split()) for o in outputs]))
    if not delta:
        assert rest == [] and row["mean_reward_delta"] == row["mean_score"]
    else:
        ((ref_prompts, ref_outputs),) = rest
        by_prompt = dict(zip(BANDIT_PROMPTS, references))
        assert ref_outputs == [by_prompt[p] for p in ref_prompts]
        reference_scores = {p: len(r.split()) for p, r in by_prompt.items()}
        assert row["mean_reward_delta"] == pytest.approx(
            row["mean_score"] - np.mean([reference_scores[p] for p in prompts])
        )


def test_adaptive_controller_moves_once_per_minibatch(word_model: Path, tmp_path: Path) -> None:
    # trlX v0.6.0: after each minibatch's ppo_epochs updates, from the round's k3 estimate (far below the
    # target of 6 here, so the error clips at -0.2): 8 rollouts / 4 = 2 moves in one round.
    config = PPOConfig(
        iterations=1,
        num_rollouts=8,
        chunk_size=4,
        batch_size=4,
        ppo_epochs=3,
        max_new_tokens=3,
        learning_rate=1e-3,
        num_layers_unfrozen=-1,
    )
    train_ppo(str(word_model), BANDIT_PROMPTS, None, RecordingScorer(), tmp_path, config)
    row = json.loads((tmp_path / "log_history.json").read_text())[0]
    assert 0 <= row["controller_kl"] < 6.0
    assert row["kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 4 / 10000) ** 2)
