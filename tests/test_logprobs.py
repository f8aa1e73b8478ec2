"""Both layouts against a plain forward of prompt + response (one unpadded row each), values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from rrhf.logprobs import batch_response_logprobs, group_logprob_sums, response_logprobs

VOCAB = 101


def make_model(family: str, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **special,
        )
    elif family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **special)
    elif family == "gptj":
        config = GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128, **special)
    else:  # Gemma 3 text with a final-logit soft-cap, to check the model's own head logic is used
        config = Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=64,
            final_logit_softcapping=3.0,
            **special,
        )
    config._attn_implementation = attn
    model_cls = {
        "llama": LlamaForCausalLM,
        "gpt2": GPT2LMHeadModel,
        "gptj": GPTJForCausalLM,
        "gemma3": Gemma3ForCausalLM,
    }[family]
    return model_cls(config).eval()


def reference(model, prompt, responses):
    """log pi(y_t | x, y_<t) from one full forward of prompt + response per response, no padding."""
    out = []
    for response in responses:
        response = torch.as_tensor(response, dtype=torch.long)
        if response.numel() == 0:
            out.append(torch.zeros(0))
            continue
        ids = torch.cat([torch.as_tensor(prompt), response])[None]
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        n = len(prompt)
        out.append(logp[n - 1 : -1].gather(-1, response[:, None]).squeeze(-1))
    return out


def sample(seed: int, n_prompt: int, lengths: list[int]):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (n_prompt,), generator=gen)
    return prompt, [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]


MODELS = [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("gptj", "sdpa"), ("gemma3", "sdpa")]


@pytest.mark.parametrize("family,attn", MODELS)
@pytest.mark.parametrize("layout", ["shared", "concat"])
def test_matches_plain_forward(family, attn, layout):
    model = make_model(family, attn)
    prompt, responses = sample(0, 9, [6, 1, 0, 13, 4])
    with torch.no_grad():
        expected = reference(model, prompt, responses)
        got = response_logprobs(model, prompt, responses, layout=layout)
        # plain Python lists are accepted too
        got_lists = response_logprobs(model, prompt.tolist(), [r.tolist() for r in responses], layout=layout)
    assert [g.shape for g in got] == [(len(r),) for r in responses]
    for g, g_list, e in zip(got, got_lists, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)
        torch.testing.assert_close(g_list, g, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gemma3"])
def test_gradients_agree_between_layouts(family):
    prompt, responses = sample(1, 7, [5, 2, 9])
    weights = [torch.linspace(0.5, 1.5, len(r)) for r in responses]
    grads = {}
    for layout in ("reference", "shared", "concat"):
        model = make_model(family)
        if layout == "reference":
            logps = reference(model, prompt, responses)
        else:
            logps = response_logprobs(model, prompt, responses, layout=layout)
        sum(((w * lp).sum() for w, lp in zip(weights, logps)), torch.zeros(())).backward()
        grads[layout] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # the prompt's part of the graph is there: its embedding rows receive gradient
    embedding = next(n for n in grads["shared"] if "embed" in n or "wte" in n)
    assert grads["shared"][embedding][prompt].abs().sum() > 0
    for layout in ("shared", "concat"):
        assert grads[layout].keys() == grads["reference"].keys()
        for name, grad in grads["reference"].items():
            torch.testing.assert_close(grads[layout][name], grad, atol=1e-5, rtol=1e-4, msg=f"{layout} {name}")


@pytest.mark.parametrize("layout", ["shared", "concat"])
def test_several_groups_in_one_batch(layout):
    model = make_model("llama")
    groups = [sample(2, 4, [3, 8]), sample(3, 11, [1, 0, 5, 2]), sample(4, 1, [7])]
    with torch.no_grad():
        batched = batch_response_logprobs(model, groups, layout=layout)
        sums, lengths = group_logprob_sums(model, groups, layout=layout)
    assert sums.shape == lengths.shape == (3, 4)
    for b, (prompt, responses) in enumerate(groups):
        expected = reference(model, prompt, responses)
        assert len(batched[b]) == len(responses)
        for i, (got, exp) in enumerate(zip(batched[b], expected)):
            torch.testing.assert_close(got, exp, atol=1e-5, rtol=0)
            assert lengths[b, i].item() == len(responses[i])
            assert abs(sums[b, i].item() - exp.sum().item()) < 1e-4
        assert (sums[b, len(responses) :] == 0).all() and (lengths[b, len(responses) :] == 0).all()


def test_shared_refuses_what_it_cannot_do_exactly():
    model = make_model("gemma3")  # sliding window of 64 tokens
    prompt, responses = sample(5, 50, [20])
    with pytest.raises(ValueError, match="sliding window"):
        response_logprobs(model, prompt, responses, layout="shared")
    got = response_logprobs(model, prompt, responses, layout="concat")[0]
    torch.testing.assert_close(got, reference(model, prompt, responses)[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="layout"):
        response_logprobs(model, prompt, responses, layout="packed")
    with pytest.raises(ValueError, match="prompt"):
        response_logprobs(model, [], responses)
