"""The project's data files: prompts and data-set responses, training files, JSON lines.

Prompts and responses follow the Dahoas/rm-static schema (prompt, chosen, rejected). The IMDB appendix's
task is built into the same schema: a review's first tokens are the prompt, the rest of the review is
`chosen`, and there is no `rejected` (None).

A training file has the authors' format: one JSON object a line, {"query": str, "responses": [str, ...],
"scores": [float, ...]}; `read_training_file` and `write_training_file` are its one reader and writer.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
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


def read_jsonl(path: str | Path, check: Callable[[Any, str], None] | None = None) -> list[dict[str, Any]]:
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
            if check is not None:
                check(row, where)
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """Write one JSON object a line through a temporary file and a rename: a reader never sees half a file,
    and several processes writing the same rows (ranks finishing one stage) leave one whole copy."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


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

    paper-notes section 8: prompts are review prefixes of at most 64 tokens; the data set's continuation is
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


def with_dataset_responses(sampled: Sequence[str], row: dict[str, Any], fields: Iterable[str]) -> list[str]:
    """A prompt's training group: its sampled candidates, then the data set's responses named in `fields`."""
    return list(sampled) + [row[f] for f in fields if row.get(f) is not None]


def read_training_file(path: str | Path, *, allow_empty_responses: bool = True) -> list[dict[str, Any]]:
    """Read a training file, checking every line; errors (ValueError) name the file and line number.

    An empty response string is legal where a policy wrote it (it answered with EOS at once: that
    candidate scores its EOS alone); for a file a user brings, allow_empty_responses=False refuses it.
    """

    def check(row: Any, where: str) -> None:
        _check_example(row, where)
        empty = [i for i, r in enumerate(row["responses"]) if not r.strip()]
        if empty and not allow_empty_responses:
            raise ValueError(f"{where}: empty response at position {empty[0]}")

    return [{"query": row["query"], "responses": list(row["responses"]), "scores": [float(s) for s in row["scores"]]}
            for row in read_jsonl(path, check)]


def write_training_file(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write {query, responses, scores} rows (other keys dropped) as a training file."""
    write_jsonl(path, ({k: row[k] for k in ("query", "responses", "scores")} for row in rows))


def _check_example(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("query", "responses", "scores"):
        if field not in row:
            raise ValueError(f"{where}: missing field {field!r}")
    if not isinstance(row["query"], str):
        raise ValueError(f"{where}: 'query' must be a string")
    responses, scores = row["responses"], row["scores"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: 'responses' must be a list of strings")
    # bool is an int subclass in Python; a true/false score is a data error, not a number.
    if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                               for s in scores):
        raise ValueError(f"{where}: 'scores' must be a list of numbers")
    if not responses:
        raise ValueError(f"{where}: empty 'responses' list")
    if len(responses) != len(scores):
        raise ValueError(f"{where}: {len(responses)} responses but {len(scores)} scores")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"{where}: scores must be finite, got {scores}")
