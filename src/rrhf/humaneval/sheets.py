"""Blind annotation sheets for the human evaluation of Table 3 (RRHF-DP against three other systems).

The paper's design (slides lines 294-304, kept in paper_tables/slide_lines.yaml): 330 pairs on Anthropic HH with
Alpaca as the initial policy, 110 per comparison (RRHF-DP vs the data set's good response, vs PPO, vs RRHF-IP-2);
30 of them are shared by all annotators to measure agreement, the other 300 are scored; each annotator labels
130 pairs, 100 of their own and the 30 shared. `build_sheets` lays out that design (every count a parameter) and
`write_sheets` writes it as

- `key.json`: the secret un-blinding key. Per item: its comparison, which system's response is shown as A and
  which as B, where each response came from (run key, artifact path), whether it is shared and who labels it.
- `annotators/<name>.json`: one public sheet per annotator: item ids drawn at random, the prompt and the two
  responses as "A" and "B". Nothing in it names a system, a run or an artifact.

A sheet id (a hash of the key and of every public sheet) is written into every file, so that labels made on
another sheet are refused when they are collected (`collect`, in rrhf/humaneval/table3.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY_FORMAT = "humaneval-key/1"
SHEET_FORMAT = "humaneval-sheet/1"

# Table 3's comparisons, named as reference.yaml names its rows so that collect finds the paper's numbers.
PAPER_COMPARISONS = (
    ("rrhf_dp-vs-good_responses", "rrhf_dp", "dataset_chosen"),
    ("rrhf_dp-vs-ppo", "rrhf_dp", "ppo"),
    ("rrhf_dp-vs-rrhf_ip2", "rrhf_dp", "rrhf_ip2"),
)
# Table 3's design as the slides give it (lines 296-301): pairs per comparison, shared pairs, annotators
# (300 scored pairs / 100 own pairs each).
PAPER_PAIRS_PER_COMPARISON = 110
PAPER_SHARED = 30
PAPER_ANNOTATORS = 3

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Pair:
    """One test prompt with the two systems' responses and where each response was read from.

    A source is a mapping such as {"run_key": "...", "artifact": "artifacts/eval/<hash>/responses.jsonl"}; it is
    kept in the key only.
    """

    prompt: str
    evaluated_response: str
    versus_response: str
    evaluated_source: Mapping[str, Any] = field(default_factory=dict)
    versus_source: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """The system evaluated (A in Table 3, e.g. "rrhf_dp") against another (B, e.g. "dataset_chosen"), with
    the candidate pairs to draw from (one per test prompt)."""

    name: str
    evaluated: str
    versus: str
    pairs: Sequence[Pair | Sequence[Any]]


@dataclass(frozen=True)
class Sheets:
    """What `build_sheets` lays out: the secret key and one public sheet per annotator, all with `sheet_id`."""

    sheet_id: str
    key: dict[str, Any]
    annotator_sheets: dict[str, dict[str, Any]]


def _as_pair(value: Pair | Sequence[Any], where: str) -> Pair:
    if isinstance(value, Pair):
        return value
    if isinstance(value, Mapping):
        return Pair(**value)
    items = list(value)
    if len(items) not in (3, 5):
        raise ValueError(
            f"{where}: expected (prompt, response_A, response_B[, source_A, source_B]), got {len(items)} fields"
        )
    return Pair(*items)


def same_text(a: str, b: str) -> bool:
    """Whether two responses would read the same to an annotator: equal once runs of white space are one space."""
    return " ".join(a.split()) == " ".join(b.split())


def _split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _item_ids(rng: random.Random, n: int) -> list[str]:
    # Drawn, not derived from the content: an id must not hint at the comparison or at the order of drawing.
    ids: set[str] = set()
    out = []
    while len(out) < n:
        candidate = f"i{rng.getrandbits(48):012x}"
        if candidate not in ids:
            ids.add(candidate)
            out.append(candidate)
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def build_sheets(
    comparisons: Sequence[Comparison | Sequence[Any]],
    *,
    seed: int = 0,
    pairs_per_comparison: int | None = PAPER_PAIRS_PER_COMPARISON,
    shared: int = PAPER_SHARED,
    annotators: int | Sequence[str] = PAPER_ANNOTATORS,
) -> Sheets:
    """Draw the pairs to annotate and lay them out blind, one sheet per annotator (Table 3's design by default).

    `comparisons`: Comparison objects or (name, evaluated system, versus system, pairs) tuples; each pair is a
    Pair or (prompt, response of the evaluated system, response of the other, source of the first, source of
    the second). Per comparison, `pairs_per_comparison` test prompts are drawn with `seed` (None: all of them).
    `shared` pairs, spread evenly over the comparisons, are labelled by every annotator (for agreement); the
    others are dealt out so that each annotator gets a near-equal share of every comparison.
    Pairs whose two responses read the same are marked `identical` in the key, shown to nobody, and count as a
    tie when collected; they are never chosen as shared pairs. Which response is shown as A is drawn per pair.
    `annotators`: a count (named annotator-1, ...) or the names (letters, digits, "_", "-", ".").
    """
    names = [f"annotator-{i + 1}" for i in range(annotators)] if isinstance(annotators, int) else list(annotators)
    if not names:
        raise ValueError("annotators: at least one is needed")
    bad = [n for n in names if not isinstance(n, str) or not _NAME.match(n)]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"annotators: names must be distinct and made of letters, digits, '_', '-', '.'; got {names}")
    if pairs_per_comparison is not None and pairs_per_comparison < 1:
        raise ValueError(f"pairs_per_comparison={pairs_per_comparison}: expected at least 1 (or None for all)")
    if shared < 0:
        raise ValueError(f"shared={shared}: expected 0 or more")
    comps = [c if isinstance(c, Comparison) else Comparison(*c) for c in comparisons]
    if not comps:
        raise ValueError("comparisons: at least one is needed")
    if len({c.name for c in comps}) != len(comps):
        raise ValueError(f"comparisons: names must be distinct, got {[c.name for c in comps]}")
    # One annotator cannot disagree with anyone: a shared pair would only take a scored pair's place.
    shared_asked = shared if len(names) > 1 else 0
    rng = random.Random(f"rrhf-humaneval:{seed}")

    drawn: list[dict[str, Any]] = []
    for comp in comps:
        pairs = [_as_pair(p, f"comparison {comp.name}, pair {i}") for i, p in enumerate(comp.pairs)]
        want = len(pairs) if pairs_per_comparison is None else pairs_per_comparison
        if want > len(pairs):
            raise ValueError(
                f"comparison {comp.name}: {want} pairs asked (pairs_per_comparison) but {len(pairs)} "
                "given; pass fewer, or None for all"
            )
        # Each comparison draws from its own stream, so that adding a comparison leaves the others' draws alone.
        indices = random.Random(f"rrhf-humaneval:{seed}:{comp.name}").sample(range(len(pairs)), want)
        for index in indices:
            drawn.append(
                {
                    "comparison": comp,
                    "index": index,
                    "pair": pairs[index],
                    "identical": same_text(pairs[index].evaluated_response, pairs[index].versus_response),
                }
            )

    shared_quota = _split_evenly(shared_asked, len(comps))
    if shared_asked > len(drawn):
        raise ValueError(f"shared={shared}: more than the {len(drawn)} pairs drawn")
    shared_items, own_items = [], []
    for comp, quota in zip(comps, shared_quota):
        mine = [d for d in drawn if d["comparison"] is comp]
        showable = [d for d in mine if not d["identical"]]
        chosen = rng.sample(range(len(showable)), min(quota, len(showable)))
        chosen_ids = {id(showable[i]) for i in chosen}
        shared_items += [showable[i] for i in chosen]
        own_items += [d for d in mine if id(d) not in chosen_ids]

    ids = _item_ids(rng, len(shared_items) + len(own_items))
    items: dict[str, dict[str, Any]] = {}
    public: dict[str, dict[str, Any]] = {}
    assigned: dict[str, list[str]] = {n: [] for n in names}

    def add(d: dict[str, Any], item_id: str, is_shared: bool, labellers: list[str]) -> None:
        comp, pair = d["comparison"], d["pair"]
        evaluated_first = rng.random() < 0.5
        evaluated = {"system": comp.evaluated, "source": dict(pair.evaluated_source)}
        versus = {"system": comp.versus, "source": dict(pair.versus_source)}
        items[item_id] = {
            "comparison": comp.name,
            "prompt_index": d["index"],
            "shared": is_shared,
            "identical": d["identical"],
            "annotators": labellers,
            "A": evaluated if evaluated_first else versus,
            "B": versus if evaluated_first else evaluated,
            "evaluated_shown_as": "A" if evaluated_first else "B",
        }
        if not d["identical"]:
            a, b = (
                (pair.evaluated_response, pair.versus_response)
                if evaluated_first
                else (pair.versus_response, pair.evaluated_response)
            )
            public[item_id] = {"id": item_id, "prompt": pair.prompt, "response_a": a, "response_b": b}
            for name in labellers:
                assigned[name].append(item_id)

    id_iter = iter(ids)
    for d in shared_items:
        add(d, next(id_iter), True, list(names))
    # Dealt round-robin through the comparisons one after the other: every annotator gets a near-equal share of
    # each comparison (and of the total), so that one annotator's taste does not weigh on one row of Table 3.
    showable_own = []
    for comp in comps:
        mine = [d for d in own_items if d["comparison"] is comp and not d["identical"]]
        rng.shuffle(mine)
        showable_own += mine
    start = rng.randrange(len(names))
    for i, d in enumerate(showable_own, start=start):
        add(d, next(id_iter), False, [names[i % len(names)]])
    for d in own_items:
        if d["identical"]:
            add(d, next(id_iter), False, [])
    for name in names:
        rng.shuffle(assigned[name])

    key: dict[str, Any] = {
        "format": KEY_FORMAT,
        "seed": seed,
        "counts": {
            "pairs_per_comparison": pairs_per_comparison,
            "shared_asked": shared,
            "shared": len(shared_items),
            "annotators": len(names),
        },
        "comparisons": [{"name": c.name, "evaluated": c.evaluated, "versus": c.versus} for c in comps],
        "annotators": names,
        "assignments": assigned,
        "items": dict(sorted(items.items())),
    }
    sheets = {
        name: {"format": SHEET_FORMAT, "annotator": name, "items": [public[i] for i in assigned[name]]}
        for name in names
    }
    sheet_id = hashlib.sha256(_canonical({"key": key, "sheets": sheets}).encode()).hexdigest()[:16]
    key = {"sheet_id": sheet_id, **key}
    sheets = {name: {"sheet_id": sheet_id, **sheet} for name, sheet in sheets.items()}
    return Sheets(sheet_id=sheet_id, key=key, annotator_sheets=sheets)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` whole or not at all: a crash mid-write must not leave a truncated key or sheet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, value: Any) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_sheets(sheets: Sheets, out: Path) -> dict[str, Path]:
    """Write `out/key.json` (keep it from the annotators) and `out/annotators/<name>.json`; return the paths by
    name ("key" and each annotator)."""
    out = Path(out)
    written = {"key": write_json_atomic(out / "key.json", sheets.key)}
    for name, sheet in sheets.annotator_sheets.items():
        written[name] = write_json_atomic(out / "annotators" / f"{name}.json", sheet)
    return written


def read_comparisons(path: Path) -> list[Comparison]:
    """Comparisons from a JSON file {"comparisons": [{name, evaluated, versus, pairs: [{prompt,
    evaluated_response, versus_response, evaluated_source, versus_source}]}]} (the command line's input)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows: Iterable[Mapping[str, Any]] = data["comparisons"] if isinstance(data, Mapping) else data
    return [
        Comparison(name=c["name"], evaluated=c["evaluated"], versus=c["versus"], pairs=[Pair(**p) for p in c["pairs"]])
        for c in rows
    ]
