"""Training-file checks, the official and paper tokenisation rules, and multi-query batches."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rrhf.collator import RRHFCollator, dense_ranks, tokenize_example
from rrhf.data import read_training_file
from rrhf.loss import rrhf_loss

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = "a b c d e f g h i j k l m n o p q r s t".split()
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
BOS, EOS = VOCAB["<s>"], VOCAB["</s>"]


def make_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; with add_bos it prepends <s> like a LLaMA tokenizer, without it adds nothing."""
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def ids(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


# ---- the training file -------------------------------------------------------------------------------

GOOD = {"query": "a b", "responses": ["c", "d e"], "scores": [0.5, -1]}


def test_reads_good_file_and_skips_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n  \n" + json.dumps({**GOOD, "query": "f"}) + "\n")
    rows = read_training_file(path)
    assert [r["query"] for r in rows] == ["a b", "f"]
    assert rows[0]["responses"] == ["c", "d e"] and rows[0]["scores"] == [0.5, -1.0]


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"responses": ["c"], "scores": [1]}), "missing field 'query'"),
    (json.dumps({"query": "a", "scores": [1]}), "missing field 'responses'"),
    (json.dumps({"query": "a", "responses": ["c"]}), "missing field 'scores'"),
    (json.dumps({**GOOD, "query": 3}), "'query' must be a string"),
    (json.dumps({**GOOD, "responses": "c"}), "'responses' must be a list of strings"),
    (json.dumps({**GOOD, "responses": ["c", 1]}), "'responses' must be a list of strings"),
    (json.dumps({**GOOD, "scores": ["1", 2]}), "'scores' must be a list of numbers"),
    (json.dumps({**GOOD, "scores": [True, 2]}), "'scores' must be a list of numbers"),
    (json.dumps({**GOOD, "scores": [1.0]}), "2 responses but 1 scores"),
    ('{"query": "a", "responses": ["c", "d"], "scores": [NaN, 1]}', "finite"),
    ('{"query": "a", "responses": ["c", "d"], "scores": [1, Infinity]}', "finite"),
    (json.dumps({"query": "a", "responses": [], "scores": []}), "empty 'responses'"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(ValueError) as info:
        read_training_file(path)
    assert f"{path}:3" in str(info.value) and message in str(info.value)


# ---- tokenisation ------------------------------------------------------------------------------------


def test_official_rules_with_a_llama_like_tokenizer():
    tok = make_tokenizer(add_bos=True)
    example = {"query": "a b c", "responses": ["d e f g h", "i"], "scores": [1.0, 2.0]}
    # |query| = 4 (BOS a b c); budget 10 - 4 = 6: BOS + "d e f g h" + EOS is 7 tokens, cut to 6 (EOS lost).
    out = tokenize_example(example, tok, semantics="official", model_max_length=10)
    assert out["query_ids"] == [BOS] + ids("a b c")
    assert out["responses_ids"] == [[BOS] + ids("d e f g h"), [BOS] + ids("i") + [EOS]]
    assert out["pad_length"] == 4 + 6
    assert out["scores"] == [1.0, 2.0]


@pytest.mark.parametrize("max_len", [5, 4, 3])
def test_official_budget_of_one_or_less_truncates_nothing(max_len):
    tok = make_tokenizer(add_bos=True)
    example = {"query": "a b c", "responses": ["d e f"], "scores": [0.0]}
    out = tokenize_example(example, tok, semantics="official", model_max_length=max_len)
    # The query is cut to its first max_len tokens; the budget max_len - |query| is 1 or 0: no response cut.
    assert out["query_ids"] == ([BOS] + ids("a b c"))[:max_len]
    assert out["responses_ids"] == [[BOS] + ids("d e f") + [EOS]]
    assert out["pad_length"] == len(out["query_ids"]) + 5


def test_official_rules_without_bos():
    tok = make_tokenizer(add_bos=False)
    out = tokenize_example(
        {"query": "a b", "responses": ["c d"], "scores": [0.0]}, tok, semantics="official", model_max_length=192
    )
    assert out["query_ids"] == ids("a b") and out["responses_ids"] == [ids("c d") + [EOS]]


def test_paper_rules():
    tok = make_tokenizer(add_bos=True)
    example = {"query": "a b c", "responses": ["d e", "f g h i j k"], "scores": [0.0, 1.0]}
    out = tokenize_example(example, tok, semantics="paper", max_prompt_tokens=8, max_response_tokens=4)
    # Responses: no BOS, at most max_response_tokens of text, then exactly one EOS (never lost).
    assert out["query_ids"] == [BOS] + ids("a b c")
    assert out["responses_ids"] == [ids("d e") + [EOS], ids("f g h i") + [EOS]]
    assert out["pad_length"] == 4 + 5


def test_paper_rules_keep_the_end_of_a_long_query_and_its_bos():
    from rrhf.generation import prompt_ids

    tok = make_tokenizer(add_bos=True)
    example = {"query": "a b c d e f g", "responses": ["h i"], "scores": [0.0]}
    out = tokenize_example(example, tok, semantics="paper", max_prompt_tokens=4)
    # At most 4 query tokens, as sampling truncates prompts: BOS and the last three words; the response whole.
    assert out["query_ids"] == [BOS] + ids("e f g") == prompt_ids(tok, example["query"], 4)
    assert out["responses_ids"] == [ids("h i") + [EOS]]
    no_bos = tokenize_example(example, make_tokenizer(add_bos=False), semantics="paper", max_prompt_tokens=4)
    assert no_bos["query_ids"] == ids("d e f g") and no_bos["responses_ids"] == [ids("h i") + [EOS]]


def test_paper_rules_keep_every_response_token_after_a_300_token_prompt():
    # Issue 14 item 3: with the old rule a prompt of 191 tokens or more left a budget of one token, so
    # every response became one token. The defaults are the HH settings (192 / 256 / 128).
    tok = make_tokenizer(add_bos=True)
    words = WORDS * 15  # 300 words
    response = "q r s t " * 10  # 40 tokens
    example = {"query": " ".join(words), "responses": [response, "p"], "scores": [1.0, 0.0]}
    out = tokenize_example(example, tok, semantics="paper", model_max_length=192)
    assert out["responses_ids"] == [ids(response) + [EOS], ids("p") + [EOS]]
    # The query keeps its BOS and its last 255 tokens: the end, which the responses answer.
    assert out["query_ids"] == [BOS] + ids(" ".join(words[-255:]))
    official = tokenize_example(example, tok, semantics="official", model_max_length=192)
    assert len(official["query_ids"]) == 192  # the authors' rule is unchanged: first 192 query tokens


def test_pad_responses_count_in_the_padded_length_only():
    # The authors padded DP's six rows before only_use_provide dropped four: L_pad counts the dropped ones.
    tok = make_tokenizer(add_bos=True)
    example = {"query": "a b", "responses": ["c", "d"], "scores": [1.0, 0.0], "pad_responses": ["e f g h i j"]}
    for semantics in ("official", "paper"):
        out = tokenize_example(example, tok, semantics=semantics)
        assert len(out["responses_ids"]) == 2
        bos = [BOS] if semantics == "official" else []
        assert out["pad_length"] == 3 + len(bos) + 6 + 1
    alone = {k: v for k, v in example.items() if k != "pad_responses"}
    batch = RRHFCollator(tok, semantics="official")([example, alone])
    assert batch["pad_lengths"].tolist() == [3 + 8, 3 + 3] and batch["valid"].tolist() == [[True, True]] * 2


def test_training_group_and_pad_responses_in_the_training_file(tmp_path):
    from rrhf.data import training_group, write_training_file

    row = {"prompt": "q", "chosen": "c", "rejected": "r"}
    sampled, fields = ["s1", "s2"], ["chosen", "rejected"]
    assert training_group(sampled, row, fields) == (["s1", "s2", "c", "r"], [])
    assert training_group(sampled, row, fields, train_on="sampled") == (["s1", "s2"], [])  # D
    assert training_group(sampled, row, fields, train_on="provided") == (["c", "r"], [])  # P
    assert training_group(sampled, row, fields, train_on="provided", pad_over_group=True) == (["c", "r"], sampled)
    assert training_group(sampled, row, fields, train_on="sampled", pad_over_group=True) == (sampled, ["c", "r"])
    with pytest.raises(ValueError, match="train_on"):
        training_group(sampled, row, fields, train_on="some")
    path = tmp_path / "train.jsonl"
    rows = [
        {"query": "q", "responses": ["c", "r"], "scores": [1.0, 0.0], "pad_responses": sampled},
        {"query": "q", "responses": ["c"], "scores": [1.0], "pad_responses": []},
    ]
    write_training_file(path, rows)
    assert read_training_file(path) == [rows[0], {"query": "q", "responses": ["c"], "scores": [1.0]}]
    path.write_text(json.dumps({"query": "q", "responses": ["c"], "scores": [1], "pad_responses": [3]}) + "\n")
    with pytest.raises(ValueError, match="pad_responses"):
        read_training_file(path)


# ---- the collator ------------------------------------------------------------------------------------


def test_dense_ranks():
    assert dense_ranks([0.5, -1.0, 0.5, 3.0]) == [1, 0, 1, 2]


def test_collates_several_queries_of_different_k():
    tok = make_tokenizer(add_bos=True)
    examples = [
        {"query": "a", "responses": ["b", "c d", "e"], "scores": [0.25, 0.5, 0.25]},
        {"query": "f g", "responses": ["h i j", "k"], "scores": [-2.0, 7.5]},
    ]
    batch = RRHFCollator(tok, semantics="official", model_max_length=192)(examples)
    assert len(batch["groups"]) == 2
    q0, r0 = batch["groups"][0]
    assert q0.tolist() == [BOS, VOCAB["a"]] and [r.tolist() for r in r0][1] == [BOS] + ids("c d") + [EOS]
    assert batch["valid"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["reward_ranks"].dtype == torch.long
    assert batch["pad_lengths"].tolist() == [2 + 4, 3 + 5]
    # Ranks keep the order of the scores exactly: same loss as with the raw scores.
    sums = -torch.rand(2, 3, dtype=torch.float64)
    lengths = torch.tensor([[2, 4, 3], [5, 3, 0]])
    scores = torch.tensor([[0.25, 0.5, 0.25], [-2.0, 7.5, 0.0]], dtype=torch.float64)
    for semantics in ("paper", "official"):
        kwargs = dict(semantics=semantics, pad_lengths=batch["pad_lengths"], valid=batch["valid"])
        a = rrhf_loss(sums, lengths, batch["reward_ranks"], **kwargs)
        b = rrhf_loss(sums, lengths, scores, **kwargs)
        torch.testing.assert_close(a.loss, b.loss, atol=0, rtol=0)
