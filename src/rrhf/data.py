"""The project's data files: prompts and data-set responses, training files, JSON lines.

Prompts and responses follow the Dahoas/rm-static schema (prompt, chosen, rejected). The IMDB appendix's
task is built into the same schema: a review's first tokens are the prompt, the rest of the review is
`chosen`, and there is no `rejected` (None).

A training file has the authors' format: one JSON object a line, {"query": str, "responses": [str, ...],
"scores": [float, ...]}; `read_training_file` and `write_training_file` are its one reader and writer. A line
may also hold "pad_responses": the rest of the authors' six-candidate group when P or D trains on a part of
it, which only sets the padded row length of the official loss (paper-notes section 2).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")


def load_split(source: str | Path, split: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of one split: a local folder holding `<split>.jsonl`, or a Hugging Face data set name.

    Every row is checked for the rm-static fields, with the file and line named on error.
    """
    folder = Path(str(source)).expanduser()
    if folder.is_dir():
        where = folder / f"{split}.jsonl"
        rows = read_jsonl(where, _check_row)
    else:
        where = f"{source}[{split}]"
        rows = hub_rows(str(source), split)
        for i, row in enumerate(rows):
            _check_row(row, f"{where} row {i}")
    if not rows:
        raise ValueError(f"{where}: no rows (the split is empty or holds only blank lines)")
    return rows if limit is None else rows[:limit]


def hub_rows(name: str, split: str) -> list[dict[str, Any]]:
    """The rows of one split of a Hugging Face data set: the one place the project loads Hub data.

    The data set's snapshot comes from the local cache at the commit the run pinned (`rrhf.hub`); `datasets`
    maps its files to splits as it does on the Hub (the card's `configs:`, else the file names).
    """
    import datasets

    from rrhf import hub

    folder = hub.snapshot(name, "dataset")
    try:
        return [dict(r) for r in datasets.load_dataset(str(folder), split=split)]
    except ValueError as error:  # e.g. a split the data set does not have
        raise ValueError(f"data set {name} ({folder}): {error}") from error


def read_jsonl(path: str | Path, check: Callable[[Any, str], None] | None = None) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (UTF-8), each passed to `check(row, "file:line")`; blank lines skipped.

    Errors (ValueError) name the file and the line number: bytes that are not UTF-8, a line that is not
    JSON, an object that names a key twice (JSON would keep only the last).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file not found")
    rows = []
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        except _DuplicateKey as error:
            raise ValueError(f"{where}: key {error.args[0]!r} appears twice in one object") from None
        if check is not None:
            check(row, where)
        rows.append(row)
    return rows


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered lines of a UTF-8 file (a leading byte-order mark allowed), split as text-mode reading splits
    them; a byte that is not UTF-8 is named by its line and position instead of a bare UnicodeDecodeError."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}:{line}: byte {error.start - line_start + 1} of the line (0x{data[error.start]:02x}) "
            "is not UTF-8; data files must be UTF-8 text, one JSON object a line"
        ) from None
    return enumerate(io.StringIO(text, newline=None), start=1)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def strict_json(obj: Any, where: str | Path, **kwargs: Any) -> str:
    """`json.dumps` that refuses NaN and infinities (which JSON has no words for: Python would write the
    non-standard `NaN` / `Infinity`), naming `where` and the key path of the first such value."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        bad = _non_finite(obj, "")
        if bad is None:
            raise
        raise ValueError(
            f"{where}: {bad[0] or 'the value'} is {bad[1]}, not a finite number; refusing to write "
            "it (JSON files are written strict, without NaN or Infinity)"
        ) from None


def _non_finite(node: Any, at: str) -> tuple[str, float] | None:
    if isinstance(node, float) and not math.isfinite(node):
        return at, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{at}.{key}" if isinstance(key, str) else f"{at}[{key}]")
        if found:
            return found[0].lstrip("."), found[1]
    return None


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """Write one JSON object a line (strict JSON: `strict_json`) through a temporary file and a rename: a
    reader never sees half a file, and several processes writing the same rows (ranks finishing one stage)
    leave one whole copy."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for number, row in enumerate(rows, start=1):
                handle.write(strict_json(row, f"{path}:{number}") + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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


# Stanford Alpaca's two prompts (tatsu-lab/stanford_alpaca, train.py's PROMPT_DICT): how Alpaca was trained and
# asked, and so how Wombat, trained from it on Alpaca's prompts, was.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:"
)


def alpaca_rows(source: str, split: str, *, limit: int | None = None, test_size: int = 0) -> list[dict[str, Any]]:
    """Alpaca's instructions (tatsu-lab/alpaca: instruction, input, output; one `train` split) as prompts in Alpaca's
    template, the data set's `output` (written by text-davinci-003) as `chosen`. The data set has no test split: the
    last `test_size` rows are held out as "test" and "train" is the rows before them (the first `limit`)."""
    folder = Path(str(source)).expanduser()
    if folder.is_dir():
        raw, where = read_jsonl(folder / "train.jsonl"), str(folder / "train.jsonl")
    else:
        raw, where = hub_rows(str(source), "train"), f"{source}[train]"
    if not 0 <= test_size < len(raw):
        raise ValueError(
            f"task.test_size={test_size}: {where} has {len(raw)} rows; at least one must stay for training"
        )
    rows = raw[len(raw) - test_size :] if split == "test" else raw[: len(raw) - test_size]
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("instruction", "output")):
            raise ValueError(f"{where} row {i}: expected string fields 'instruction' and 'output'")
        if not row["instruction"].strip():
            raise ValueError(f"{where} row {i}: empty instruction")
        given = row.get("input") or ""
        template = ALPACA_PROMPT_WITH_INPUT if given.strip() else ALPACA_PROMPT
        out.append({"prompt": template.format(instruction=row["instruction"], input=given), "chosen": row["output"]})
    if not out:
        raise ValueError(f"{where}: no rows for split {split!r}")
    return out if limit is None else out[:limit]


IMDB_RULES = ("rl4lms", "tokens")


def imdb_prefix_rows(
    source: str,
    split: str,
    *,
    rule: str = "rl4lms",
    limit: int | None = None,
    prompt_fraction: float = 0.5,
    shuffle_seed: int | None = 42,
    train_fraction: float = 0.8,
    tokenizer: str | None = None,
    prefix_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """IMDB reviews as prompts and continuations, with the whole review kept as `reference`.

    rule "rl4lms" (default; RL4LMs' IMDB data pool, paper-notes section 8): the reviews of the split are
    shuffled with `shuffle_seed`; "train" is the first `train_fraction` of the shuffled training reviews;
    the prompt is the review's first `prompt_fraction` of its space-separated words, the continuation
    (`chosen`) the rest of its text. Generation left-truncates the prompt to its token limit.
    rule "tokens" (this project's first reading): the prompt is the first `prefix_tokens` tokens of the
    `tokenizer` (line breaks "<br />" made spaces first), the continuation the rest; reviews no longer
    than the prefix are skipped.
    """
    if rule not in IMDB_RULES:
        raise ValueError(f"task.prefix.rule={rule!r}: expected one of {IMDB_RULES}")
    if rule == "tokens":
        return _token_prefix_rows(source, split, tokenizer, prefix_tokens, limit)
    reviews = [row["text"] for row in hub_rows(source, split)]
    if shuffle_seed is not None:
        import datasets

        # The same permutation as RL4LMs' `dataset.shuffle(seed)`, whatever the row type.
        order = datasets.Dataset.from_dict({"i": list(range(len(reviews)))}).shuffle(seed=shuffle_seed)["i"]
        reviews = [reviews[i] for i in order]
    if split == "train":
        reviews = reviews[: int(len(reviews) * train_fraction)]
    rows = []
    for text in reviews[:limit] if limit else reviews:
        words = text.split(" ")
        prompt = " ".join(words[: int(len(words) * prompt_fraction)])
        rows.append({"prompt": prompt, "chosen": text[len(prompt) :], "rejected": None, "reference": text})
    return rows


def _token_prefix_rows(
    source: str, split: str, tokenizer_name: str | None, prefix_tokens: int | None, limit: int | None
) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from rrhf import hub

    if not tokenizer_name or not prefix_tokens:
        raise ValueError("task.prefix.rule=tokens needs task.prefix.tokenizer and task.prefix.prefix_tokens")
    tokenizer = AutoTokenizer.from_pretrained(
        hub.snapshot(tokenizer_name) if hub.is_hub_id(tokenizer_name) else tokenizer_name
    )
    rows = []
    for row in hub_rows(source, split)[:limit] if limit else hub_rows(source, split):
        text = row["text"].replace("<br />", " ")
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= prefix_tokens:
            continue  # nothing left to continue
        prompt = tokenizer.decode(ids[:prefix_tokens])
        rows.append({"prompt": prompt, "chosen": text[len(prompt) :], "rejected": None, "reference": text})
    return rows


def with_dataset_responses(sampled: Sequence[str], row: dict[str, Any], fields: Iterable[str]) -> list[str]:
    """A prompt's training group: its sampled candidates, then the data set's responses named in `fields`."""
    return list(sampled) + [row[f] for f in fields if row.get(f) is not None]


TRAIN_ON = ("all", "sampled", "provided")


def training_group(
    sampled: Sequence[str],
    row: dict[str, Any],
    fields: Iterable[str],
    *,
    train_on: str = "all",
    pad_over_group: bool = False,
) -> tuple[list[str], list[str]]:
    """The candidates a prompt trains on and, with `pad_over_group`, the rest of its group.

    The group is `with_dataset_responses`. `train_on` "sampled" keeps the sampled candidates (D, the
    authors' only_use_sample), "provided" the data set's (P, only_use_provide), "all" both (DP). The rest
    is returned only with `pad_over_group`: the authors' code padded the whole group before dropping a
    part of it, so the official loss divides by a padded length that counts the dropped candidates.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"sampling.train_on={train_on!r}: expected one of {TRAIN_ON}")
    provided = with_dataset_responses([], row, fields)
    kept = {"all": list(sampled) + provided, "sampled": list(sampled), "provided": provided}[train_on]
    rest = {"all": [], "sampled": provided, "provided": list(sampled)}[train_on]
    return kept, rest if pad_over_group else []


def read_training_file(path: str | Path, *, allow_empty_responses: bool = True) -> list[dict[str, Any]]:
    """Read a training file, checking every line; errors (ValueError) name the file and line number.

    An empty response string is legal where a policy wrote it (it answered with EOS at once: that
    candidate scores its EOS alone); for a file a user brings, allow_empty_responses=False refuses it. An
    empty query is refused everywhere, as an empty data-set prompt is, and so is a file without an example.
    """

    def check(row: Any, where: str) -> None:
        _check_example(row, where)
        empty = [i for i, r in enumerate(row["responses"]) if not r.strip()]
        if empty and not allow_empty_responses:
            raise ValueError(f"{where}: empty response at position {empty[0]}")

    rows = [
        {
            "query": row["query"],
            "responses": list(row["responses"]),
            "scores": [float(s) for s in row["scores"]],
            **({"pad_responses": list(row["pad_responses"])} if row.get("pad_responses") else {}),
        }
        for row in read_jsonl(path, check)
    ]
    if not rows:
        raise ValueError(f"{path}: no training examples (the file is empty or holds only blank lines)")
    return rows


def write_training_file(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write {query, responses, scores} rows, and pad_responses where a row has some, as a training file; `sources`
    (sampling=sources: which source wrote each response) travels along where a row has it."""
    keys = ("query", "responses", "scores", "pad_responses", "sources")
    write_jsonl(path, ({k: row[k] for k in keys if k in row and (k != "pad_responses" or row[k])} for row in rows))


def without_failed(
    examples: Sequence[dict[str, Any]], failed: Sequence[Sequence[bool]], *, min_candidates: int = 2
) -> tuple[list[int], list[dict[str, Any]]]:
    """The examples to train on when some candidates have no score (`failed[i][j]`: the LLM judge could not read
    an answer about candidate j of example i), and their indices in `examples`.

    A failed candidate leaves its group: it has no place in the ranking, where any stand-in score (0, the group's
    mean) would be a judgement nobody made. A group that lost a candidate and keeps fewer than `min_candidates`
    is left out (nothing to rank); a group without a failure is kept as it is, whatever its size, as before.
    """
    kept, out = [], []
    for i, (example, bad) in enumerate(zip(examples, failed, strict=True)):
        if not any(bad):
            kept.append(i)
            out.append(example)
            continue
        good = [j for j, b in enumerate(bad) if not b]
        if len(good) < min_candidates:
            continue
        kept.append(i)
        out.append(
            {
                **example,
                "responses": [example["responses"][j] for j in good],
                "scores": [example["scores"][j] for j in good],
                **({"sources": [example["sources"][j] for j in good]} if "sources" in example else {}),
            }
        )
    return kept, out


def _check_example(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("query", "responses", "scores"):
        if field not in row:
            raise ValueError(f"{where}: missing field {field!r}")
    if not isinstance(row["query"], str):
        raise ValueError(f"{where}: 'query' must be a string")
    if not row["query"].strip():
        raise ValueError(f"{where}: empty 'query'")
    responses, scores = row["responses"], row["scores"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: 'responses' must be a list of strings")
    # bool is an int subclass in Python; a true/false score is a data error, not a number.
    if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise ValueError(f"{where}: 'scores' must be a list of numbers")
    if not responses:
        raise ValueError(f"{where}: empty 'responses' list")
    if len(responses) != len(scores):
        raise ValueError(f"{where}: {len(responses)} responses but {len(scores)} scores")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"{where}: scores must be finite, got {scores}")
    pad = row.get("pad_responses", [])
    if not isinstance(pad, list) or not all(isinstance(r, str) for r in pad):
        raise ValueError(f"{where}: 'pad_responses' must be a list of strings")
