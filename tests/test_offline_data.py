"""The offline data set shipped in data/imdb_offline: format, sizes, distinct prompts and sentiment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "imdb_offline"
FIELDS = ("prompt", "response", "chosen", "rejected")
MIN_ROWS = {"train": 200, "test": 50}


def _read(split: str) -> list[dict]:
    lines = (DATA_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {split: _read(split) for split in MIN_ROWS}


@pytest.fixture(scope="module")
def compound(splits) -> dict[str, list[float]]:
    """VADER compound score of each field, over both splits."""
    analyzer = SentimentIntensityAnalyzer()
    rows = splits["train"] + splits["test"]
    return {
        field: [analyzer.polarity_scores(row[field])["compound"] for row in rows]
        for field in ("prompt", "chosen", "rejected")
    }


@pytest.mark.parametrize("split", list(MIN_ROWS))
def test_every_line_is_a_json_object(split):
    for number, line in enumerate((DATA_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        assert isinstance(json.loads(line), dict), f"{split}.jsonl:{number}"


def test_fields_are_non_empty_strings_and_response_is_chosen(splits):
    for split, rows in splits.items():
        for i, row in enumerate(rows):
            assert set(row) == set(FIELDS), (split, i)
            for field in FIELDS:
                assert isinstance(row[field], str) and row[field].strip(), (split, i, field)
            assert row["response"] == row["chosen"], (split, i)
            assert row["chosen"] != row["rejected"], (split, i)


def test_text_joins_and_is_plain_prose(splits):
    for split, rows in splits.items():
        for i, row in enumerate(rows):
            # prompt + continuation must read as one text, as the policy will see it
            assert row["prompt"] == row["prompt"].strip(), (split, i)
            for field in ("chosen", "rejected"):
                assert row[field].startswith(" ") and not row[field].startswith("  "), (split, i, field)
            for text in (row["prompt"], row["chosen"], row["rejected"]):
                assert "Human:" not in text and "Assistant:" not in text and "<" not in text, (split, i)


def test_sizes(splits):
    for split, minimum in MIN_ROWS.items():
        assert len(splits[split]) >= minimum, split


def test_prompts_are_distinct_within_and_across_splits(splits):
    train = [row["prompt"] for row in splits["train"]]
    test = [row["prompt"] for row in splits["test"]]
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_chosen_is_positive_and_rejected_is_negative(compound):
    assert all(score > 0.3 for score in compound["chosen"])
    assert all(score < -0.3 for score in compound["rejected"])


def test_prompts_are_mostly_mild(compound):
    mild = [abs(score) < 0.6 for score in compound["prompt"]]
    assert sum(mild) >= 0.8 * len(mild)


def test_project_loader_reads_both_splits(splits):
    from rrhf.data import load_split

    for split, rows in splits.items():
        assert load_split(DATA_DIR, split) == rows
