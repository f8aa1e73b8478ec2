"""Generation as the authors ran it, on a tiny LLaMA with a SentencePiece tokenizer (issue 14 items 4, 5, 9).

The model is a deterministic chain: its only transformer block is switched off (zero output projections), so
the next token depends on the last one alone, through one-hot embeddings and an lm_head that maps each
token of a chosen path to the next. What it generates is then known token for token: after prompt A the
response " The acting is superb" and EOS; after prompt B at once EOS (the response a distant second), then
the same response.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures.tokenizers import sentencepiece_folder, sentencepiece_processor
from omegaconf import OmegaConf
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rrhf.assets import add_pad_token, load_causal_lm
from rrhf.generation import decode_new, generate_batch, greedy_responses, prompt_ids

PROMPT_A = "Human: What is a good movie?\n\nAssistant:"
PROMPT_B = "Human: Can you tell me more about it?"
RESPONSE = " The acting is superb"  # the form of a data set's response: rm-static's start with a space


def _chain_model(folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    response = tokenizer(RESPONSE, add_special_tokens=False).input_ids
    last_a, last_b = tokenizer(PROMPT_A).input_ids[-1], tokenizer(PROMPT_B).input_ids[-1]
    path = {last_a: response[0], last_b: eos, eos: response[0]}
    path |= {a: b for a, b in zip(response, response[1:])} | {response[-1]: eos}
    assert len({last_a, last_b, eos, *response}) == 3 + len(response)  # a chain, no token twice
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=vocab,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for a, b in path.items():
            model.lm_head.weight[b, a] = 1.0  # the RMS-normed one-hot gives b a logit of sqrt(vocab) ~ 20
        model.lm_head.weight[response[0], last_b] = 0.5  # after B, the response is second to EOS
    model.save_pretrained(folder)


@pytest.fixture(scope="module", params=["model_only", "with_json"])
def chain(request, tmp_path_factory) -> Path:
    """A folder with the chain model and its SentencePiece tokenizer: tokenizer.model alone (converted by
    transformers, the slow tokenizer's path) or with tokenizer.json (the fast path)."""
    folder = sentencepiece_folder(tmp_path_factory.mktemp("chain"), with_json=request.param == "with_json")
    _chain_model(folder)
    return folder


def _sampling(**overrides) -> OmegaConf:
    # DP's generator settings (conf/sampling/DP.yaml).
    cfg = dict(
        generator="diverse_beam",
        num_candidates=4,
        num_beams=4,
        num_beam_groups=4,
        diversity_penalty=1.0,
        max_new_tokens=6,
        max_prompt_tokens=256,
        prompt_bos="keep",
        stop_at_eos=True,
    )
    return OmegaConf.create(cfg | overrides)


def test_decoding_keeps_the_leading_space_of_a_sentencepiece_response(chain: Path) -> None:
    model, tokenizer = load_causal_lm(str(chain))
    groups = generate_batch(model, tokenizer, [PROMPT_A], _sampling(), seed=0)
    # Decoding the new tokens alone would give "The acting is superb": SentencePiece drops the space that
    # opens a text. The authors decode the whole row and remove the prompt, which keeps it.
    assert groups == [[RESPONSE] * 4]
    new_only = tokenizer.decode(tokenizer(RESPONSE, add_special_tokens=False).input_ids)
    assert new_only == RESPONSE.lstrip()
    assert greedy_responses(model, tokenizer, [PROMPT_A, PROMPT_B], max_new_tokens=6) == [RESPONSE, ""]


def test_decode_new_agrees_with_sentencepiece_itself(chain: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(chain)
    sp = sentencepiece_processor(chain)
    prompt = tokenizer(PROMPT_A).input_ids
    response = tokenizer(RESPONSE, add_special_tokens=False).input_ids
    out = torch.tensor([prompt + response + [tokenizer.eos_token_id]])
    whole = sp.decode(prompt[1:] + response)  # what SentencePiece makes of the row, BOS aside
    assert decode_new(tokenizer, out, len(prompt)) == [whole[len(sp.decode(prompt[1:])) :]] == [RESPONSE]


def test_stop_at_eos(chain: Path) -> None:
    model, tokenizer = load_causal_lm(str(chain))
    # Prompt B's first token is EOS. Stopping there leaves an empty response; without the stop (the
    # authors' GenerationConfig named no EOS) the beams run to max_new_tokens and the text after EOS is kept.
    assert generate_batch(model, tokenizer, [PROMPT_B], _sampling(), seed=0) == [[""] * 4]
    # Seven tokens: B gives EOS + the response + EOS; A the response, EOS, and the response's first word again.
    assert generate_batch(
        model, tokenizer, [PROMPT_B, PROMPT_A], _sampling(stop_at_eos=False, max_new_tokens=7), seed=0
    ) == [[RESPONSE] * 4, [RESPONSE + " The"] * 4]
    # Beam search (its best beam) and top-k sampling (k = 1: the chain) follow the same switch.
    for cfg in (
        _sampling(generator="beam", num_candidates=1, num_beams=2),
        _sampling(generator="top_k", num_candidates=2, top_k=1, temperature=1.0),
    ):
        n = cfg.num_candidates
        assert generate_batch(model, tokenizer, [PROMPT_B], cfg, seed=0) == [[""] * n]
        cfg.stop_at_eos = False
        assert generate_batch(model, tokenizer, [PROMPT_B], cfg, seed=0) == [[RESPONSE] * n]


def test_prompt_bos_rules(chain: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(chain)
    bos = tokenizer.bos_token_id
    full = tokenizer(PROMPT_A).input_ids
    assert full[0] == bos
    assert prompt_ids(tokenizer, PROMPT_A, 6, bos="keep") == [bos] + full[-5:]  # the tokenizer keeps BOS
    assert prompt_ids(tokenizer, PROMPT_A, 6, bos="cut") == full[-6:]  # the authors' last 256: BOS gone
    assert prompt_ids(tokenizer, PROMPT_A, 6, bos="none") == full[-6:]  # trlX: no special tokens at all
    assert prompt_ids(tokenizer, PROMPT_A, 100, bos="cut") == full  # a short prompt keeps its BOS
    assert prompt_ids(tokenizer, PROMPT_A, 100, bos="none") == full[1:]
    with pytest.raises(ValueError, match="prompt_bos"):
        prompt_ids(tokenizer, PROMPT_A, 6, bos="drop")


def test_authors_pad_token(chain: Path) -> None:
    model, tokenizer = load_causal_lm(str(chain))
    assert tokenizer.pad_token == tokenizer.eos_token  # the project's rule: pad with EOS
    model, tokenizer = load_causal_lm(str(chain), authors_pad=True)  # train.py:296-301
    vocab = len(AutoTokenizer.from_pretrained(chain))
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == vocab
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert weight.shape[0] == vocab + 1
        torch.testing.assert_close(weight[-1], weight[:-1].mean(0))
    assert not add_pad_token(model, tokenizer)  # only when there is none
    # The mean row enters every softmax: the chain still decodes the same, with a slightly lower probability.
    assert generate_batch(model, tokenizer, [PROMPT_A], _sampling(), seed=0) == [[RESPONSE] * 4]


def test_min_new_tokens_holds_eos_back(chain: Path) -> None:
    # RL4LMs' IMDB generation: min_length counts new tokens, so EOS cannot end a response early.
    model, tokenizer = load_causal_lm(str(chain))
    assert greedy_responses(model, tokenizer, [PROMPT_B], max_new_tokens=4) == [""]
    assert greedy_responses(model, tokenizer, [PROMPT_B], max_new_tokens=4, min_new_tokens=4) == [" The acting is"]
    cfg = _sampling(generator="top_k", num_candidates=1, top_k=1, temperature=1.0, min_new_tokens=4, max_new_tokens=4)
    assert generate_batch(model, tokenizer, [PROMPT_B], cfg, seed=0) == [[" The acting is"]]
