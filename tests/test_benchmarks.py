"""The benchmarks compute what they claim: the train-step benchmark's authors' variant (full-vocabulary
log-softmax at every position, as the authors' train.py) gives the same log-probs as the project's layouts."""

import importlib.util
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_authors_variant_matches_the_layouts() -> None:
    bench = _module("train_step")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    groups = bench.make_groups(96, queries=2, k=3, seed=0)
    with torch.no_grad():
        authors = bench.token_logprobs(model, groups, "authors")
        for layout in bench.LAYOUTS:
            ours = bench.token_logprobs(model, groups, layout)
            for a_group, o_group in zip(authors, ours, strict=True):
                for a, o in zip(a_group, o_group, strict=True):
                    assert a.shape == o.shape and torch.allclose(a, o, atol=1e-5)
        sums, lengths = bench.logprob_sums(model, groups, "authors")
        ref_sums, ref_lengths = bench.logprob_sums(model, groups, "shared")
    assert torch.equal(lengths, ref_lengths) and torch.allclose(sums, ref_sums, atol=1e-4)
