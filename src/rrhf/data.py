"""Prompts and dataset responses in the Dahoas/rm-static schema (prompt, chosen, rejected).

The IMDB appendix's task is built into the same schema: a review's first tokens are the prompt, the
rest of the review is `chosen`, and there is no `rejected` (None).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")


def load_split(source: str | Path, split: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of one split: a local folder holding `<split>.jsonl`, or a Hugging Face data set name.

    Every row is checked for the rm-static fields, with the file and line named on error.
    """
    folder = Path(str(source)).expanduser()
    if folder.is_dir():
        rows = read_jsonl(folder / f"{split}.jsonl", _check_row)
    else:
        import datasets

        rows = [dict(r) for r in datasets.load_dataset(str(source), split=split)]
        for i, row in enumerate(rows):
            _check_row(row, f"{source}[{split}] row {i}")
    return rows if limit is None else rows[:limit]


def read_jsonl(path: str | Path, check: Callable[[Any, str], None]) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, each passed to `check(row, "file:line")`; blank lines skipped.

    Errors (ValueError) name the file and the line number.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file not found")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            check(row, where)
            rows.append(row)
    return rows


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in row:
            raise ValueError(f"{where}: missing field {field!r}")
        if not isinstance(row[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string")
    if not row["prompt"].strip():
        raise ValueError(f"{where}: empty prompt")


def imdb_prefix_rows(source: str, split: str, *, tokenizer_name: str, prefix_tokens: int,
                     limit: int | None = None) -> list[dict[str, Any]]:
    """IMDB reviews as prompt (the first `prefix_tokens` tokens) and continuation (the rest).

    FACTS section 8: prompts are review prefixes of at most 64 tokens; the data set's continuation is
    the review's own text after them, which Table 10's "BP" setting adds to the sampled candidates.
    """
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    reviews = datasets.load_dataset(source, split=split)["text"]
    rows = []
    for text in reviews[:limit] if limit else reviews:
        text = text.replace("<br />", " ")
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= prefix_tokens:
            continue  # nothing left to continue
        prompt = tokenizer.decode(ids[:prefix_tokens])
        rows.append({"prompt": prompt, "chosen": text[len(prompt):], "rejected": None})
    return rows
