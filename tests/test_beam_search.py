"""Diverse beam search against transformers 4.55.4 (recorded), the project's plain beam search, and greedy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rrhf.beam_search import diverse_beam_search

FIXTURES = Path(__file__).parent / "fixtures" / "group_beam"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine spinning workers can stall.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def recorded_models() -> dict:
    return {
        name: AutoModelForCausalLM.from_pretrained(FIXTURES / name).eval()
        for name in sorted({case["model"] for case in CASES})
    }


def _inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    mask = case["attention_mask"]
    return torch.tensor(case["input_ids"]), None if mask is None else torch.tensor(mask)


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_matches_recorded_transformers_455(case, recorded_models):
    ids, mask = _inputs(case)
    out = diverse_beam_search(recorded_models[case["model"]], ids, mask, **case["kwargs"])
    expected = torch.tensor(case["expected"])
    assert out.shape == expected.shape
    assert torch.equal(out, expected)


def test_recorded_cases_exercise_eos_padding_and_group_shapes(recorded_models):
    """The fixtures are only as good as what they cover: early eos, left padding, several beam/group shapes."""
    early_cases = 0
    for case in CASES:
        ids, _ = _inputs(case)
        kwargs = case["kwargs"]
        eos = kwargs["eos_token_id"]
        if eos is None:
            eos = recorded_models[case["model"]].generation_config.eos_token_id
        generated = torch.tensor(case["expected"])[:, ids.shape[1] :]
        # A hypothesis that ended before max_new_tokens: eos followed by at least one pad.
        early_cases += bool((generated[:, :-1] == eos).any())
    assert early_cases >= 4
    assert any(case["attention_mask"] and min(map(min, case["attention_mask"])) == 0 for case in CASES)
    shapes = {(c["kwargs"]["num_beams"], c["kwargs"]["num_beam_groups"]) for c in CASES}
    assert {(4, 4), (4, 2), (6, 3)} <= shapes
    assert any(c["kwargs"]["num_return_sequences"] < c["kwargs"]["num_beams"] for c in CASES)
    assert any(c["kwargs"]["length_penalty"] != 1.0 for c in CASES)


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def _left_padded(seed: int, lengths=(4, 7, 2), vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _greedy(model, ids, mask, max_new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=1
        )


# With a single group and no penalty, diverse beam search is plain beam search. transformers 5.x runs a
# vectorised rewrite of it whose early-stop test looks at the best *running* beam, where 4.x looks at the
# best candidate including eos ones; the two agree whenever that test does not decide (verified against
# 4.55.4, where the rewrite and the 4.x scorer show the same split). So: an eos that is never produced
# (the max-length path) in every shape, and a frequently produced eos in settings where both searches agree.
# pad_token_id is 1, not 0: 5.x fills finished beams with eos when the pad id is 0 (`pad or eos`).
@pytest.mark.parametrize("num_beams,num_return,length_penalty", [(2, 2, 1.0), (4, 3, 0.5), (5, 1, 2.0)])
def test_single_group_equals_project_beam_search_at_max_length(num_beams, num_return, length_penalty):
    model = _tiny_llama(3)
    ids, mask = _left_padded(3)
    emitted = set(_greedy(model, ids, mask, 24)[:, ids.shape[1] :].flatten().tolist())
    silent = next(t for t in range(4, 97) if t not in emitted)
    kwargs = dict(
        num_beams=num_beams,
        num_return_sequences=num_return,
        max_new_tokens=14,
        length_penalty=length_penalty,
        eos_token_id=silent,
        pad_token_id=1,
    )
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    out = diverse_beam_search(model, ids, mask, num_beam_groups=1, diversity_penalty=0.0, **kwargs)
    assert torch.equal(out, reference)


@pytest.mark.parametrize(
    "seed,num_beams,num_return,length_penalty", [(1, 4, 2, 1.0), (3, 3, 3, 0.5), (4, 4, 2, 1.0), (5, 3, 3, 0.5)]
)
def test_single_group_equals_project_beam_search_with_eos(seed, num_beams, num_return, length_penalty):
    model = _tiny_llama(seed)
    ids, mask = _left_padded(seed)
    generated = _greedy(model, ids, mask, 16)[:, ids.shape[1] :].flatten()
    eos = int(torch.bincount(generated, minlength=97).argmax())  # the model's favourite token
    kwargs = dict(
        num_beams=num_beams,
        num_return_sequences=num_return,
        max_new_tokens=12,
        length_penalty=length_penalty,
        eos_token_id=eos,
        pad_token_id=1,
    )
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    assert (reference[:, ids.shape[1] : -1] == eos).any(), "the eos should end some hypothesis early"
    out = diverse_beam_search(model, ids, mask, num_beam_groups=1, diversity_penalty=0.0, **kwargs)
    assert torch.equal(out, reference)


def test_groups_of_one_beam_hold_the_greedy_path_and_differ_at_the_first_token():
    """Group 0 is never penalised, so with one beam per group it is greedy decoding; a huge penalty forces
    every later group to open with a token no earlier group chose."""
    model = _tiny_llama(7)
    ids, mask = _left_padded(7, lengths=(5,))
    greedy = _greedy(model, ids, mask, 10)
    out = diverse_beam_search(
        model,
        ids,
        mask,
        num_beams=4,
        num_beam_groups=4,
        diversity_penalty=1e4,
        num_return_sequences=4,
        max_new_tokens=10,
        eos_token_id=None,
        pad_token_id=1,
    )
    assert any(torch.equal(row, greedy[0]) for row in out)
    assert len(set(out[:, ids.shape[1]].tolist())) == 4


def test_rejects_what_transformers_455_rejects():
    model = _tiny_llama(0)
    ids, mask = _left_padded(0, lengths=(3,))
    base = dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=2, max_new_tokens=3)
    for bad in (
        dict(diversity_penalty=0.0),
        dict(num_beam_groups=3),
        dict(num_return_sequences=5),
        dict(num_beams=1, num_beam_groups=1),
    ):
        with pytest.raises(ValueError):
            diverse_beam_search(model, ids, mask, **{**base, **bad})
    model.generation_config.repetition_penalty = 1.3  # a processor 4.x would apply and this code does not
    with pytest.raises(NotImplementedError, match="repetition_penalty"):
        diverse_beam_search(model, ids, mask, **base)
