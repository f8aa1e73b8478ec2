"""Collect annotators' labels into Table 3 (win / tie / lose of the evaluated system) and its agreement figures.

Labels files are what the annotation page downloads: {"sheet_id", "annotator", "labels": {item id: "A"|"tie"|"B"}}
where "A" / "B" name the response shown under that letter. An automatic judge writes the same format and may add
"judge": its name. Every file is checked against the key before anything is counted (LabelsError names the file
and the item): the same sheet, a known annotator given once, every item of that annotator's sheet labelled once
and no other, only the three labels. A file that names a judge may also mark an item "unparsed" (the judge
gave no readable verdict): the item is left out of every count and the tables say how many were; people's
files have no such entry, and an item missing from any file is refused.

Scores (Table 3's rows). Per comparison, over its scored pairs (those not shared: the paper scores 300 pairs and
keeps the 30 shared ones for agreement), each labelled by one annotator, plus its identical pairs (never shown,
counted as ties): win = the evaluated system's response was preferred, lose = the other's, tie. Printed as counts
and per 100 scored pairs (the paper prints per 100, from 100 pairs per comparison).

Agreement, over the shared pairs, each labelled by every annotator. For each shared item and each unordered pair
of annotators {i, j} (with 3 annotators and 30 items: 3 x 30 = 90 annotator pairs):

- same annotation % = 100 x (annotator pairs whose two labels are equal) / (all annotator pairs);
- no-contradiction % = 100 x (annotator pairs that are not one "A" and one "B") / (all annotator pairs): a
  contradiction is one annotator preferring A and the other B; a tie beside either is no contradiction.

The paper reports 57.7% and 84.4% (slides lines 303-304); with 90 annotator pairs those are 52/90 = 57.78% and
76/90 = 84.44%, so the paper's 57.7 is 52/90 cut after one decimal (rounded it would read 57.8); no count over
90 rounds to 57.7. Also Cohen's kappa per annotator pair and Fleiss' kappa over all annotators, on the shared items.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rrhf import PROJECT_ROOT
from rrhf.humaneval.sheets import KEY_FORMAT, write_json_atomic, write_text_atomic

REFERENCE = PROJECT_ROOT / "paper_tables" / "reference.yaml"
LABELS = ("A", "tie", "B")
# An automatic judge's explicit "no verdict" for an item: never a label, never counted, reported as a count.
UNPARSED = "unparsed"
OUTCOMES = ("win", "tie", "lose")
# The agreement figures are not table cells, so reference.yaml has no entries for them (its `missing` says so);
# they are kept here with their slide lines (paper_tables/slide_lines.yaml holds those lines too).
PAPER_AGREEMENT = {"same": 57.7, "no_contradiction": 84.4, "source": "seed-rrhf-slides.txt, lines 303-304"}
HUMAN = "human annotators"


class LabelsError(ValueError):
    """A labels file (or the key) that cannot be counted: the message names the file and, where one is at
    fault, the item."""


@dataclass
class Row:
    """One comparison's outcome for the evaluated system."""

    comparison: str
    evaluated: str
    versus: str
    counts: dict[str, int]
    identical: int
    paper: dict[str, float] | None = None
    paper_label: list[str] | None = None

    @property
    def scored(self) -> int:
        return sum(self.counts.values())

    def per100(self) -> dict[str, float]:
        n = self.scored
        return {k: (100.0 * v / n if n else math.nan) for k, v in self.counts.items()}


@dataclass
class Agreement:
    """Agreement on the shared items (see the module's docstring for the definitions)."""

    items: int
    annotators: list[str]
    annotator_pairs: int
    same: int
    contradictions: int
    cohen: dict[str, float | None] = field(default_factory=dict)
    fleiss: float | None = None

    @property
    def same_percent(self) -> float:
        return 100.0 * self.same / self.annotator_pairs if self.annotator_pairs else math.nan

    @property
    def no_contradiction_percent(self) -> float:
        return (
            100.0 * (self.annotator_pairs - self.contradictions) / self.annotator_pairs
            if self.annotator_pairs
            else math.nan
        )


@dataclass
class Table3:
    sheet_id: str
    judge: str
    rows: list[Row]
    agreement: Agreement
    files: list[Path] = field(default_factory=list)
    unparsed: int = 0  # scored or shared items the (automatic) judge gave no verdict, left out of the counts

    @property
    def human(self) -> bool:
        return self.judge == HUMAN


# --- reading and checking ---------------------------------------------------------------------------------------


def _no_duplicate_keys(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                # The hook does not know which object it is in: a label value tells an item from a field.
                what = f"item {k} is labelled twice" if v in LABELS else f"field {k!r} appears twice"
                raise LabelsError(f"{path}: {what}")
            seen[k] = v
        return seen

    return hook


def _read_json(path: Path, what: str) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LabelsError(f"{path}: cannot read the {what}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise LabelsError(f"{path}: the {what} is not UTF-8 text") from e
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise LabelsError(
            f"{path}: not a complete JSON {what} (truncated or malformed?): {e.msg} at line "
            f"{e.lineno}, column {e.colno}"
        ) from e


def read_key(path: Path) -> dict[str, Any]:
    """The key `write_sheets` wrote, checked for the fields collect needs."""
    key = _read_json(path, "key")
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
        raise LabelsError(f"{path}: not a human-evaluation key (expected format {KEY_FORMAT!r})")
    missing = [k for k in ("sheet_id", "annotators", "assignments", "items", "comparisons") if k not in key]
    if missing:
        raise LabelsError(f"{path}: the key lacks {missing}")
    return key


def check_labels(data: Any, path: Path | str, key: Mapping[str, Any], key_name: str = "the key") -> dict[str, str]:
    """The labels of one annotator's file, checked against the key; LabelsError names the file and the item."""
    if not isinstance(data, dict):
        raise LabelsError(f"{path}: expected a JSON object {{sheet_id, annotator, labels}}, got {type(data).__name__}")
    missing = [k for k in ("sheet_id", "annotator", "labels") if k not in data]
    if missing:
        raise LabelsError(f"{path}: missing {', '.join(missing)} (expected {{sheet_id, annotator, labels}})")
    if data["sheet_id"] != key["sheet_id"]:
        raise LabelsError(
            f"{path}: labels for sheet {data['sheet_id']!r}, but {key_name} is for sheet "
            f"{key['sheet_id']!r}: labels made on another sheet are refused"
        )
    annotator = data["annotator"]
    if annotator not in key["annotators"]:
        raise LabelsError(
            f"{path}: annotator {annotator!r} is not on sheet {key['sheet_id']} "
            f"(its annotators: {', '.join(key['annotators'])})"
        )
    labels = data["labels"]
    if not isinstance(labels, dict):
        raise LabelsError(f"{path}: 'labels' must map item ids to 'A', 'tie' or 'B'")
    allowed = (*LABELS, UNPARSED) if data.get("judge") else LABELS
    own = key["assignments"][annotator]
    mine = set(own)
    for item, label in labels.items():
        if item not in mine:
            where = "an item of another annotator" if item in key["items"] else "not an item of this sheet"
            raise LabelsError(f"{path}: unknown item {item} for annotator {annotator} ({where})")
        if label not in allowed:
            also = f" (or {UNPARSED!r}, from an automatic judge)" if label == UNPARSED else ""
            raise LabelsError(f"{path}: item {item}: label {label!r} is not one of 'A', 'tie', 'B'{also}")
    lacking = [i for i in own if i not in labels]
    if lacking:
        shown = ", ".join(lacking[:5]) + (", ..." if len(lacking) > 5 else "")
        raise LabelsError(
            f"{path}: {len(lacking)} of annotator {annotator}'s {len(own)} items have no label "
            f"(first missing item: {lacking[0]}; missing: {shown})"
        )
    return dict(labels)


def read_labels(
    paths: Sequence[Path], key: Mapping[str, Any], key_name: str = "the key"
) -> tuple[dict[str, dict[str, str]], str | None]:
    """Every annotator's labels from `paths`, one file per annotator, and the judge the files name (None: none)."""
    by_annotator: dict[str, dict[str, str]] = {}
    source: dict[str, Path] = {}
    judges: dict[Path, str | None] = {}
    for path in map(Path, paths):
        data = _read_json(path, "labels file")
        labels = check_labels(data, path, key, key_name)
        annotator = data["annotator"]
        if annotator in by_annotator:
            raise LabelsError(f"{path}: annotator {annotator} is labelled twice, here and in {source[annotator]}")
        by_annotator[annotator] = labels
        source[annotator] = path
        judges[path] = data.get("judge")
    absent = [a for a in key["annotators"] if a not in by_annotator]
    if absent:
        raise LabelsError(
            f"no labels file for annotator(s) {', '.join(absent)} of sheet {key['sheet_id']} "
            f"(given: {', '.join(map(str, paths)) or 'none'})"
        )
    named = set(judges.values())
    if len(named) > 1:
        raise LabelsError(
            "labels files from different judges cannot make one table: "
            + "; ".join(f"{p}: {j or 'no judge (people)'}" for p, j in judges.items())
        )
    return by_annotator, named.pop() if named else None


# --- counting ---------------------------------------------------------------------------------------------------


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two annotators over the same items (any labels); None where chance agreement is 1 (both
    gave one and the same label throughout), which leaves kappa undefined.

    Here rather than imported: the formula is a few lines, and statsmodels / scikit-learn, which have it, are not
    dependencies of the project."""
    n = len(first)
    if n == 0 or n != len(second):
        return None
    observed = sum(a == b for a, b in zip(first, second)) / n
    ca, cb = Counter(first), Counter(second)
    chance = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def fleiss_kappa(ratings: Sequence[Sequence[Hashable]]) -> float | None:
    """Fleiss' kappa for items each labelled by the same number (>= 2) of annotators: per item the labels given.
    None where it is undefined (no items, fewer than 2 labels an item, or every label the same).

    Its observed part (the mean over items of the share of agreeing annotator pairs) is the same-annotation
    fraction of Table 3's agreement."""
    if not ratings:
        return None
    raters = len(ratings[0])
    if raters < 2 or any(len(r) != raters for r in ratings):
        return None
    counts = [Counter(r) for r in ratings]
    categories = set().union(*counts)
    per_item = [(sum(v * v for v in c.values()) - raters) / (raters * (raters - 1)) for c in counts]
    observed = sum(per_item) / len(ratings)
    chance = sum((sum(c[k] for c in counts) / (len(ratings) * raters)) ** 2 for k in categories)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def agreement(key: Mapping[str, Any], labels: Mapping[str, Mapping[str, str]]) -> Agreement:
    """Same-annotation and no-contradiction counts over all annotator pairs on each shared item, and the kappas;
    a shared item some annotator (an automatic judge) marked unparsed is left out."""
    shared = [
        i
        for i, item in key["items"].items()
        if item["shared"] and not item["identical"] and all(labels[a][i] != UNPARSED for a in key["annotators"])
    ]
    names = list(key["annotators"])
    same = contradictions = pairs = 0
    for item in shared:
        given = [labels[a][item] for a in names]
        for x, y in itertools.combinations(given, 2):
            pairs += 1
            same += x == y
            contradictions += {x, y} == {"A", "B"}
    cohen = (
        {
            f"{a} / {b}": cohen_kappa([labels[a][i] for i in shared], [labels[b][i] for i in shared])
            for a, b in itertools.combinations(names, 2)
        }
        if shared
        else {}
    )
    fleiss = fleiss_kappa([[labels[a][i] for a in names] for i in shared])
    return Agreement(
        items=len(shared),
        annotators=names,
        annotator_pairs=pairs,
        same=same,
        contradictions=contradictions,
        cohen=cohen,
        fleiss=fleiss,
    )


def outcome(item: Mapping[str, Any], label: str) -> str:
    """A label on the shown letters, turned into the evaluated system's win / tie / lose."""
    if label == "tie":
        return "tie"
    return "win" if label == item["evaluated_shown_as"] else "lose"


def paper_table3(reference: Path = REFERENCE) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Table 3's spec and its printed numbers by row id ({"win", "tie", "lose"}) from reference.yaml."""
    ref = yaml.safe_load(Path(reference).read_text(encoding="utf-8"))
    spec = ref["tables"][3]
    numbers: dict[str, dict[str, float]] = {}
    for e in ref["entries"]:
        if e["table"] == 3:
            numbers.setdefault(e["row"], {})[e["column"]] = float(e["value"])
    return spec, numbers


def tally(
    key: Mapping[str, Any],
    labels: Mapping[str, Mapping[str, str]],
    *,
    reference: Path | None = REFERENCE,
    judge: str | None = None,
) -> Table3:
    """Table 3 from checked labels: un-blinded with the key, beside the paper's numbers where a comparison is named
    as a reference.yaml row."""
    spec, paper = paper_table3(reference) if reference is not None else ({"rows": {}}, {})
    rows = []
    unparsed = sum(label == UNPARSED for given in labels.values() for label in given.values())
    for comp in key["comparisons"]:
        counts = dict.fromkeys(OUTCOMES, 0)
        identical = 0
        for item_id, item in key["items"].items():
            if item["comparison"] != comp["name"] or item["shared"]:
                continue
            if item["identical"]:
                identical += 1
                counts["tie"] += 1
                continue
            (annotator,) = item["annotators"]
            if labels[annotator][item_id] != UNPARSED:
                counts[outcome(item, labels[annotator][item_id])] += 1
        row_spec = spec["rows"].get(comp["name"]) or {}
        rows.append(
            Row(
                comparison=comp["name"],
                evaluated=comp["evaluated"],
                versus=comp["versus"],
                counts=counts,
                identical=identical,
                paper=paper.get(comp["name"]),
                paper_label=row_spec.get("label"),
            )
        )
    return Table3(
        sheet_id=key["sheet_id"],
        judge=judge or HUMAN,
        rows=rows,
        agreement=agreement(key, labels),
        unparsed=unparsed,
    )


# --- writing ----------------------------------------------------------------------------------------------------


def _tex(text: Any) -> str:
    text = str(text)
    for char, escape in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("$", r"\$"),
        ("#", r"\#"),
        ("_", r"\_"),
        ("{", r"\{"),
        ("}", r"\}"),
        ("~", r"\textasciitilde{}"),
        ("^", r"\textasciicircum{}"),
    ):
        text = text.replace(char, escape)
    return text


def _paper_label_tex(label: str) -> str:
    # reference.yaml keeps the slides' "RRHF _{DP}": a subscript, set as one.
    name, sep, sub = label.partition(" _{")
    if not sep:
        return _tex(name)
    return _tex(name) + "$_{\\mathrm{" + _tex(sub.rstrip("}")) + "}}$"


def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "--"
    text = f"{value:.{digits}f}"
    # A difference of -0.3 printed with no decimals reads "-0": no sign on a zero.
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _judged_by(table: Table3, tex: bool = False) -> str:
    if table.human:
        return f"Judged by {HUMAN} ({len(table.agreement.annotators)} annotators, blind to the systems)"
    judged = f"Judged by {_tex(table.judge) if tex else table.judge}, an automatic judge (not human annotators)"
    if table.unparsed:
        judged += f"; {table.unparsed} labels without a readable verdict (unparsed) are left out of every count"
    return judged


def _agreement_text(table: Table3, tex: bool) -> str:
    ag = table.agreement
    pct = r"\%" if tex else "%"
    if not ag.annotator_pairs:
        return "No shared pairs: no agreement figures."
    kappa = "Fleiss' $\\kappa$" if tex else "Fleiss' kappa"
    return (
        f"Agreement on the {ag.items} shared pairs ({ag.annotator_pairs} annotator pairs): same annotation "
        f"{_fmt(ag.same_percent, 1)}{pct}, no contradiction {_fmt(ag.no_contradiction_percent, 1)}{pct} "
        f"(paper: {PAPER_AGREEMENT['same']}{pct}, {PAPER_AGREEMENT['no_contradiction']}{pct}); "
        f"{kappa} {_fmt(ag.fleiss, 2)}."
    )


def _labels(row: Row, tex: bool) -> tuple[str, str]:
    if row.paper_label:
        a, b = row.paper_label
        return (
            (_paper_label_tex(a), _paper_label_tex(b))
            if tex
            else (a.replace(" _{", "-").rstrip("}"), b.replace(" _{", "-").rstrip("}"))
        )
    return (_tex(row.evaluated), _tex(row.versus)) if tex else (row.evaluated, row.versus)


def _tabular(headers: list[str], lines: list[list[str]], align: str, caption: str, label: str) -> str:
    body = "\n".join(" & ".join(cells) + r" \\" for cells in lines)
    return (
        f"\\begin{{table}}[t]\n\\centering\n\\caption{{{caption}}}\n\\label{{{label}}}\n"
        f"\\begin{{tabular}}{{{align}}}\n\\toprule\n{' & '.join(headers)} \\\\\n\\midrule\n{body}\n"
        f"\\bottomrule\n\\end{{tabular}}\n\\end{{table}}\n"
    )


def table_tex(table: Table3) -> str:
    """Ours: win / tie / lose per 100 scored pairs (the paper's unit) and the counts behind them."""
    lines = []
    for row in table.rows:
        p = row.per100()
        lines.append([*_labels(row, True), str(row.scored)] + [f"{_fmt(p[k], 0)} ({row.counts[k]})" for k in OUTCOMES])
    caption = (
        f"Table 3 (ours): {_judged_by(table, True)}. Win / tie / lose of A against B per 100 scored pairs "
        f"(counts in brackets; pairs with identical responses count as ties). {_agreement_text(table, True)} "
        f"Sheet {table.sheet_id}."
    )
    return _tabular(["A", "B", "pairs", "win", "tie", "lose"], lines, "llrrrr", caption, "tab:table3")


def vs_paper_tex(table: Table3) -> str:
    """Ours beside the paper's Table 3, and the agreement figures beside the paper's."""
    lines = []
    for row in table.rows:
        p = row.per100()
        cells = [*_labels(row, True)]
        for k in OUTCOMES:
            ours, theirs = p[k], (row.paper or {}).get(k)
            diff = None if theirs is None or math.isnan(ours) else ours - theirs
            cells += [_fmt(theirs, 0), _fmt(ours, 0), _fmt(diff, 0)]
        lines.append(cells)
    headers = ["A", "B"] + [f"{k} {part}" for k in OUTCOMES for part in ("paper", "ours", r"$\Delta$")]
    caption = (
        f"Table 3 of the paper (human annotators; HH, $\\rho$ = Alpaca) beside ours, win / tie / lose of A "
        f"against B per 100 scored pairs. Ours: {_judged_by(table, True)}."
    )
    main = _tabular(headers, lines, "ll" + "r" * 9, caption, "tab:table3-vs-paper")
    ag = table.agreement
    agree_lines = [
        ["Same annotation (\\%)", f"{PAPER_AGREEMENT['same']:.1f}", _fmt(ag.same_percent, 1)],
        ["No contradiction (\\%)", f"{PAPER_AGREEMENT['no_contradiction']:.1f}", _fmt(ag.no_contradiction_percent, 1)],
        ["Fleiss' $\\kappa$", "--", _fmt(ag.fleiss, 2)],
    ] + [[f"Cohen's $\\kappa$, {_tex(pair)}", "--", _fmt(k, 2)] for pair, k in ag.cohen.items()]
    agree_caption = (
        f"Table 3's agreement on the shared pairs: over every pair of annotators on each shared item "
        f"(ours: {ag.items} items, {ag.annotator_pairs} annotator pairs; the paper: 30 items, 3 "
        f"annotators). The paper's figures are from {_tex(PAPER_AGREEMENT['source'])}; they are 52/90 and 76/90 "
        f"annotator pairs cut after one decimal (57.78 and 84.44), ours are rounded. Ours: {_judged_by(table, True)}."
    )
    return main + "\n" + _tabular(["", "paper", "ours"], agree_lines, "lrr", agree_caption, "tab:table3-agreement")


def table_csv(table: Table3) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "comparison",
            "A",
            "B",
            "evaluated",
            "versus",
            "judge",
            "pairs",
            "identical",
            *OUTCOMES,
            *(f"{k}_per100" for k in OUTCOMES),
            *(f"{k}_paper" for k in OUTCOMES),
        ]
    )
    for row in table.rows:
        p = row.per100()
        writer.writerow(
            [
                row.comparison,
                *_labels(row, False),
                row.evaluated,
                row.versus,
                table.judge,
                row.scored,
                row.identical,
                *(row.counts[k] for k in OUTCOMES),
                *(_fmt(p[k], 1) for k in OUTCOMES),
                *(_fmt((row.paper or {}).get(k), 0) if row.paper else "" for k in OUTCOMES),
            ]
        )
    return out.getvalue()


def table_md(table: Table3) -> str:
    lines = [
        f"# Table 3: win / tie / lose of A against B (sheet {table.sheet_id})",
        "",
        f"{_judged_by(table)}. Per 100 scored pairs, counts in brackets; the paper's per 100 beside.",
        "",
        "| A | B | pairs | win | tie | lose | paper win / tie / lose |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in table.rows:
        p = row.per100()
        paper = " / ".join(_fmt(row.paper.get(k), 0) for k in OUTCOMES) if row.paper else "--"
        cells = [f"{_fmt(p[k], 0)} ({row.counts[k]})" for k in OUTCOMES]
        lines.append(f"| {' | '.join(_labels(row, False))} | {row.scored} | {' | '.join(cells)} | {paper} |")
    ag = table.agreement
    lines += ["", "## Agreement on the shared pairs", "", _agreement_text(table, False), ""]
    if ag.cohen:
        lines += ["| annotators | Cohen's kappa |", "|---|---:|"]
        lines += [f"| {pair} | {_fmt(k, 2)} |" for pair, k in ag.cohen.items()]
    return "\n".join(lines) + "\n"


def table_json(table: Table3) -> dict[str, Any]:
    ag = table.agreement
    return {
        "sheet_id": table.sheet_id,
        "judge": table.judge,
        "human": table.human,
        "unparsed": table.unparsed,
        "rows": [
            {
                "comparison": r.comparison,
                "evaluated": r.evaluated,
                "versus": r.versus,
                "pairs": r.scored,
                "identical": r.identical,
                "counts": r.counts,
                "per100": r.per100(),
                "paper": r.paper,
            }
            for r in table.rows
        ],
        "agreement": {
            "items": ag.items,
            "annotators": ag.annotators,
            "annotator_pairs": ag.annotator_pairs,
            "same": ag.same,
            "contradictions": ag.contradictions,
            "same_percent": ag.same_percent,
            "no_contradiction_percent": ag.no_contradiction_percent,
            "cohen": ag.cohen,
            "fleiss": ag.fleiss,
            "paper": PAPER_AGREEMENT,
        },
    }


def collect(
    key: Path | Mapping[str, Any],
    labels: Sequence[Path],
    out: Path | None = None,
    *,
    judge: str | None = None,
    reference: Path | None = REFERENCE,
) -> Table3:
    """Check every labels file against the key, un-blind and count; with `out`, write table3.tex, table3.csv,
    table3.md, table3_vs_paper.tex and table3.json there (atomically; nothing is written if any file is refused).

    `judge`: who labelled, for the captions; None means people, unless the files name a judge ("judge" field),
    which then is used: a file from an automatic judge is never captioned as human. A `judge` that disagrees with
    the one the files name is refused."""
    key_name = str(key) if isinstance(key, (str, Path)) else "the key"
    key_data = read_key(Path(key)) if isinstance(key, (str, Path)) else dict(key)
    by_annotator, named = read_labels(labels, key_data, key_name)
    if judge is not None and named is not None and judge != named:
        raise LabelsError(f"--judge {judge!r}, but the labels files say they come from {named!r}")
    table = tally(key_data, by_annotator, reference=reference, judge=judge or named)
    if out is not None:
        out = Path(out)
        files = {
            "table3.tex": table_tex(table),
            "table3.csv": table_csv(table),
            "table3.md": table_md(table),
            "table3_vs_paper.tex": vs_paper_tex(table),
        }
        table.files = [write_text_atomic(out / name, text) for name, text in files.items()]
        table.files.append(write_json_atomic(out / "table3.json", table_json(table)))
    return table
