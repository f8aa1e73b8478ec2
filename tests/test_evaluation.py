"""Evaluation functions and the offline perplexity module, against references written plainly here."""

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from tokenizers import decoders as tk_decoders
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rrhf.evaluation import PAPER_MAX_TEXT_TOKENS, perplexities
from rrhf.generation import greedy_responses, stop_cut
from rrhf.stats import preference_accuracy, sample_statistics

METRIC_DIR = Path(__file__).resolve().parents[1] / "src" / "rrhf" / "metrics" / "perplexity"

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "a good answer is short and kind and true",
    "you can use vinegar or baking soda to clean your clothes",
    "the model ranks responses and learns from the best one",
    "human preference data helps align language models",
] * 20

TEXTS = [
    "the cat sat on the mat",
    "you can use vinegar\nto clean your clothes",
    "a good answer",
    "the model ranks responses and learns from the best one and the dog sat on the log again and again",
    "  kind  ",
    "align",
]

N_POSITIONS = 64


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: LLaMA-like (<s> BOS added to every text) or GPT-2-like (EOS only)."""
    specials = ["<s>", "</s>", "<unk>"] if kind == "llama" else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    # GPT-2-like but with no BOS at all, so the EOS fallback is the branch exercised.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _model(kind: str, tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    # A wide initialisation makes the random model's predictions far from uniform, so that per-text
    # perplexities differ by much more than the tolerances below.
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=N_POSITIONS,
            initializer_range=0.5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=N_POSITIONS,
            n_embd=32,
            n_layer=2,
            n_head=2,
            initializer_range=0.5,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def judge(request):
    tokenizer = _tokenizer(request.param)
    return request.param, _model(request.param, tokenizer), tokenizer


def reference_ppl(text: str, model, tokenizer, mode: str) -> float:
    """One unbatched forward pass per text; NLL from an explicit log_softmax."""
    text = text.replace("\n", " ").strip() or " "
    ids = tokenizer.encode(text, add_special_tokens=False)
    if mode == "paper":
        ids = ids[:19]
    else:
        ids = ids[: model.config.max_position_embeddings - 1]
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    full = torch.tensor([[first] + ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(full).logits[0].double(), dim=-1)
    nll = 0.0
    for position, token in enumerate(ids):
        nll -= logprobs[position, token].item()
    mean = nll / len(ids)
    return 2.0**mean if mode == "paper" else math.exp(mean)


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_perplexities_match_reference(judge, mode):
    _, model, tokenizer = judge
    got = perplexities(TEXTS, model, tokenizer, mode=mode, batch_size=4)
    want = [reference_ppl(t, model, tokenizer, mode) for t in TEXTS]
    assert got == pytest.approx(want, rel=1e-4)
    # The check means something only if the texts get clearly different values.
    assert max(want) / min(want) > 1.5


def test_paper_mode_keeps_first_19_tokens_and_exact_mode_does_not(judge):
    _, model, tokenizer = judge
    assert PAPER_MAX_TEXT_TOKENS == 19
    long_text = " ".join(["the cat sat on the mat and the dog sat on the log"] * 4)
    ids = tokenizer.encode(long_text, add_special_tokens=False)
    assert len(ids) >= 40
    head = tokenizer.decode(ids[:19])
    assert tokenizer.encode(head, add_special_tokens=False) == ids[:19]

    paper_long, paper_head = perplexities([long_text, head], model, tokenizer, mode="paper")
    assert paper_long == pytest.approx(paper_head, rel=1e-5)
    exact_long, exact_head = perplexities([long_text, head], model, tokenizer, mode="exact")
    assert exact_long != pytest.approx(exact_head, rel=1e-3)
    # Same 19 tokens: the two modes differ only by the base of the exponent.
    assert math.log2(paper_head) == pytest.approx(math.log(exact_head), rel=1e-5)


def test_exact_mode_truncates_to_model_positions(judge):
    _, model, tokenizer = judge
    text = " ".join(["the cat sat on the mat and the dog sat on the log"] * 8)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > N_POSITIONS
    head = tokenizer.decode(ids[: N_POSITIONS - 1])
    assert tokenizer.encode(head, add_special_tokens=False) == ids[: N_POSITIONS - 1]
    got, want = perplexities([text, head], model, tokenizer, mode="exact")
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_cleaning_rules(judge, mode):
    _, model, tokenizer = judge
    got = perplexities(["a good\nanswer\n", "", "\n\n", "  a good answer"], model, tokenizer, mode=mode)
    clean = perplexities(["a good answer", " ", " ", "a good answer"], model, tokenizer, mode=mode)
    assert got == pytest.approx(clean, rel=1e-6)
    assert got[0] == pytest.approx(reference_ppl("a good answer", model, tokenizer, mode), rel=1e-4)
    assert got[1] == pytest.approx(reference_ppl(" ", model, tokenizer, mode), rel=1e-4)


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_batching_does_not_change_values_or_order(judge, mode):
    _, model, tokenizer = judge
    one = perplexities(TEXTS, model, tokenizer, mode=mode, batch_size=1)
    for batch_size in (2, 3, 8):
        assert perplexities(TEXTS, model, tokenizer, mode=mode, batch_size=batch_size) == pytest.approx(one, rel=1e-5)
    reversed_values = perplexities(TEXTS[::-1], model, tokenizer, mode=mode, batch_size=3)
    assert reversed_values[::-1] == pytest.approx(one, rel=1e-5)


def test_perplexities_restore_training_mode_and_reject_unknown_mode(judge):
    _, model, tokenizer = judge
    model.train()
    try:
        assert perplexities(["a good answer"], model, tokenizer, mode="paper") == pytest.approx(
            [reference_ppl("a good answer", model.eval(), tokenizer, "paper")], rel=1e-4
        )
        model.train()
        perplexities(["a good answer"], model, tokenizer, mode="paper")
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError):
        perplexities(["a"], model, tokenizer, mode="natural")


def test_stop_cut():
    assert stop_cut(" Sure, here it is.\n\nHuman: thanks\n\nAssistant: ok") == "Sure, here it is."
    assert stop_cut("One.\n\nassistant: two\n\nHuman: three") == "One."
    assert stop_cut("One.\n\nhuman: two") == "One."
    assert stop_cut("Hello\nHuman: not a new turn\n") == "Hello\nHuman: not a new turn"
    assert stop_cut("\n\nHuman: nothing before") == ""
    assert stop_cut("  no stop at all  ") == "no stop at all"


def test_greedy_responses_equal_one_at_a_time(judge):
    _, model, tokenizer = judge
    prompts = ["the cat sat", "you can use vinegar or baking soda to clean your", "a good answer is short and"]
    got = greedy_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    want = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=6,
                pad_token_id=tokenizer.eos_token_id,
            )
        want.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert got == want
    assert any(w.strip() for w in want)


def test_greedy_responses_truncate_prompts_on_the_left(judge):
    kind, model, tokenizer = judge
    prompt = " ".join(["the cat sat on the mat"] * 10) + " and the dog"
    ids = tokenizer(prompt).input_ids
    kept = 8
    if kind == "llama":
        # The tokenizer's left truncation keeps the BOS in front of the last tokens of the prompt.
        short_ids = ids[:1] + ids[-(kept - 1) :]
    else:
        short_ids = ids[-kept:]
    short = torch.tensor([short_ids])
    with torch.no_grad():
        out = model.generate(
            short,
            attention_mask=torch.ones_like(short),
            do_sample=False,
            max_new_tokens=5,
            pad_token_id=tokenizer.eos_token_id,
        )
    want = tokenizer.decode(out[0, short.shape[1] :], skip_special_tokens=True)
    assert greedy_responses(model, tokenizer, [prompt], max_new_tokens=5, max_prompt_tokens=kept) == [want]


def test_preference_accuracy_counts_ties_as_wrong():
    assert preference_accuracy([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, -1.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        preference_accuracy([1.0], [])


def test_sample_statistics():
    groups = [[-1.0, -2.0, 0.5], [-3.0, -0.5, -1.5]]
    flat = [-1.0, -2.0, 0.5, -3.0, -0.5, -1.5]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat))
    stats = sample_statistics(groups)
    assert stats == pytest.approx({"mean": mean, "std": std, "max": (0.5 + -0.5) / 2})


def test_evaluate_module_loads_offline_and_matches(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = _tokenizer("gpt2")
    model = _model("gpt2", tokenizer)
    folder = tmp_path / "judge"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    metric = evaluate.load(str(METRIC_DIR), cache_dir=str(tmp_path / "cache"))
    for mode in ("paper", "exact"):
        result = metric.compute(predictions=TEXTS, model_id=str(folder), mode=mode, batch_size=4)
        want = perplexities(TEXTS, model, tokenizer, mode=mode)
        assert result["perplexities"] == pytest.approx(want, rel=1e-5)
        assert result["mean_perplexity"] == pytest.approx(sum(want) / len(want), rel=1e-5)
