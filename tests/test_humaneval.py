"""rrhf.humaneval: Table 3's blind sheets, the annotation page (its HTML; tests/test_humaneval_page.py drives it
in a browser) and collecting labels into the table, down to the paper's numbers from synthetic labels."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from rrhf.humaneval import (
    PAPER_COMPARISONS,
    LabelsError,
    build_sheets,
    cohen_kappa,
    collect,
    fleiss_kappa,
    render_page,
    split_turns,
    write_pages,
    write_sheets,
)
from rrhf.humaneval.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "paper_tables" / "reference.yaml"
SLIDE_LINES = ROOT / "paper_tables" / "slide_lines.yaml"
# Distinctive names, so that a plain substring search finds any leak into what annotators see.
SYSTEMS = {"cmp-one": ("sysq_evaluated", "sysq_chosen"), "cmp-two": ("sysq_evaluated", "sysq_ppo")}


def source(system: str, i: int) -> dict:
    return {"run_key": f"runkey-{system}-{i % 3}", "artifact": f"artifacts/eval/{system}/responses.jsonl"}


def comparisons(systems=SYSTEMS, n: int = 40, identical_every: int = 0) -> list[tuple]:
    """Pairs whose text says which system wrote it ("EVAL ..." / "OTHER ..."), so a test can label by content."""
    out = []
    for c, (name, (evaluated, versus)) in enumerate(systems.items()):
        pairs = []
        for i in range(n):
            prompt = f"\n\nHuman: Question {i} of set {c}?\n\nAssistant: Context {i}.\n\nHuman: Go on.\n\nAssistant:"
            mine = f"EVAL reply {i}"
            theirs = f"  EVAL   reply {i} " if identical_every and i % identical_every == 0 else f"OTHER reply {i}"
            pairs.append((prompt, mine, theirs, source(evaluated, i), source(versus, i)))
        out.append((name, evaluated, versus, pairs))
    return out


def paper_comparisons(n: int = 150, identical_every: int = 0) -> list[tuple]:
    return comparisons({name: (a, b) for name, a, b in PAPER_COMPARISONS}, n=n, identical_every=identical_every)


def shown(sheets) -> dict[str, dict]:
    return {item["id"]: item for sheet in sheets.annotator_sheets.values() for item in sheet["items"]}


def label_by_content(sheets, want: str = "EVAL") -> dict[str, dict[str, str]]:
    """Every annotator prefers the response whose text starts with `want`."""
    return {
        name: {it["id"]: ("A" if it["response_a"].startswith(want) else "B") for it in sheet["items"]}
        for name, sheet in sheets.annotator_sheets.items()
    }


def write_labels(folder: Path, sheets, labels: dict[str, dict[str, str]], **extra) -> list[Path]:
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, given in labels.items():
        path = folder / f"labels-{name}.json"
        path.write_text(json.dumps({"sheet_id": sheets.sheet_id, "annotator": name, "labels": given, **extra}))
        paths.append(path)
    return paths


# --- sheets -----------------------------------------------------------------------------------------------------


def test_sheets_deterministic_for_a_seed_and_differ_across_seeds():
    small = dict(pairs_per_comparison=12, shared=4, annotators=2)
    first = build_sheets(comparisons(), seed=3, **small)
    again = build_sheets(comparisons(), seed=3, **small)
    other = build_sheets(comparisons(), seed=4, **small)
    assert first == again
    assert first.sheet_id != other.sheet_id
    drawn = {(v["comparison"], v["prompt_index"]) for v in first.key["items"].values()}
    assert drawn != {(v["comparison"], v["prompt_index"]) for v in other.key["items"].values()}
    assert set(first.key["items"]) != set(other.key["items"])  # item ids are drawn with the seed too
    for sheet in first.annotator_sheets.values():
        assert sheet["sheet_id"] == first.key["sheet_id"] == first.sheet_id


def test_paper_design_by_default():
    """Table 3: 3 x 110 pairs, 30 shared (10 a comparison), 3 annotators of 100 own + 30 shared = 130 each."""
    sheets = build_sheets(paper_comparisons(), seed=0)
    items = sheets.key["items"]
    assert len(items) == 330
    per = Counter((v["comparison"], v["shared"]) for v in items.values())
    for name, _, _ in PAPER_COMPARISONS:
        assert (per[(name, True)], per[(name, False)]) == (10, 100)
    shared = {i for i, v in items.items() if v["shared"]}
    for sheet in sheets.annotator_sheets.values():
        ids = [it["id"] for it in sheet["items"]]
        assert len(ids) == len(set(ids)) == 130
        assert shared <= set(ids)
        own = Counter(items[i]["comparison"] for i in ids if not items[i]["shared"])
        assert set(own.values()) <= {33, 34} and sum(own.values()) == 100
    assert {a for v in items.values() if not v["shared"] for a in v["annotators"]} == set(sheets.annotator_sheets)


def test_small_offline_counts():
    sheets = build_sheets(comparisons(n=5), seed=1, pairs_per_comparison=4, shared=3, annotators=2)
    items = sheets.key["items"]
    assert len(items) == 8 and sum(v["shared"] for v in items.values()) == 3
    assert sorted(len(s["items"]) for s in sheets.annotator_sheets.values()) == [3 + 2, 3 + 3]  # shared + own
    everything = build_sheets(comparisons(n=5), seed=1, pairs_per_comparison=None, shared=0, annotators=["ann"])
    assert len(everything.key["items"]) == 10 and len(everything.annotator_sheets["ann"]["items"]) == 10
    alone = build_sheets(comparisons(n=5), seed=1, pairs_per_comparison=4, shared=3, annotators=1)
    assert alone.key["counts"]["shared"] == 0  # one annotator cannot disagree with anyone
    with pytest.raises(ValueError, match="comparison cmp-one: 6 pairs asked"):
        build_sheets(comparisons(n=5), pairs_per_comparison=6)
    with pytest.raises(ValueError, match="names must be distinct"):
        build_sheets(comparisons(n=5), pairs_per_comparison=2, annotators=["x", "x"])


def test_nothing_public_names_a_system(tmp_path):
    sheets = build_sheets(comparisons(), seed=5, pairs_per_comparison=20, shared=6, annotators=3)
    write_sheets(sheets, tmp_path)
    pages = write_pages(sheets, tmp_path)
    secrets = {"sysq", "runkey", "artifacts/eval", "responses.jsonl", "cmp-one", "cmp-two", "evaluated", "versus"}
    public = sorted((tmp_path / "annotators").iterdir())
    assert {p.name for p in public} == {f"annotator-{i}.{ext}" for i in (1, 2, 3) for ext in ("json", "html")}
    for path in public:
        text = path.read_text(encoding="utf-8").lower()
        assert not [s for s in secrets if s in text], path
    for sheet in sheets.annotator_sheets.values():
        assert set(sheet) == {"format", "sheet_id", "annotator", "items"}
        assert all(set(it) == {"id", "prompt", "response_a", "response_b"} for it in sheet["items"])
        assert all(re.fullmatch(r"i[0-9a-f]{12}", it["id"]) for it in sheet["items"])
    key = (tmp_path / "key.json").read_text()
    assert "sysq_evaluated" in key and "artifacts/eval/sysq_ppo/responses.jsonl" in key
    # The paper's system names, as words, on a page built for them.
    paper = build_sheets(paper_comparisons(n=20), seed=0, pairs_per_comparison=10, shared=3)
    page = render_page(paper.annotator_sheets["annotator-1"]).lower()
    for word in ("rrhf", "ppo", "dataset_chosen", "rrhf_dp", "rrhf_ip2", "alpaca", "good_responses"):
        assert not re.search(rf"\b{word}\b", page), word
    assert set(pages) == {"annotator-1", "annotator-2", "annotator-3"}


def test_identical_pairs_marked_and_not_shown(tmp_path):
    sheets = build_sheets(comparisons(n=30, identical_every=3), seed=2, pairs_per_comparison=30, shared=6)
    items = sheets.key["items"]
    identical = {i for i, v in items.items() if v["identical"]}
    assert len(identical) == 20  # every third pair of each comparison (white space differs only)
    assert all(not items[i]["shared"] and items[i]["annotators"] == [] for i in identical)
    assert not identical & set(shown(sheets))
    assert not identical & {i for ids in sheets.key["assignments"].values() for i in ids}
    for path in write_pages(sheets, tmp_path).values():
        assert not [i for i in identical if i in path.read_text()]
    # Counted as ties: everything else is a win for the evaluated system.
    write_sheets(sheets, tmp_path)
    table = collect(tmp_path / "key.json", write_labels(tmp_path, sheets, label_by_content(sheets)))
    for row in table.rows:
        scored = [v for v in items.values() if v["comparison"] == row.comparison and not v["shared"]]
        assert row.identical == sum(v["identical"] for v in scored) == row.counts["tie"]
        assert row.counts["win"] == len(scored) - row.identical and row.counts["lose"] == 0


def test_order_randomised_yet_unblinded(tmp_path):
    sheets = build_sheets(comparisons(n=60), seed=7, pairs_per_comparison=60, shared=10, annotators=2)
    items = sheets.key["items"]
    sides = Counter(v["evaluated_shown_as"] for v in items.values())
    assert sides["A"] > 30 and sides["B"] > 30
    for item_id, public in shown(sheets).items():
        side = items[item_id]["evaluated_shown_as"]
        assert public[f"response_{side.lower()}"].startswith("EVAL")
        assert items[item_id][side]["system"] == "sysq_evaluated"
    write_sheets(sheets, tmp_path)
    for want, outcome in (("EVAL", "win"), ("OTHER", "lose")):
        table = collect(tmp_path / "key.json", write_labels(tmp_path, sheets, label_by_content(sheets, want)))
        for row in table.rows:
            assert row.counts[outcome] == row.scored == 55 and row.per100()[outcome] == 100


# --- collect: refusals ------------------------------------------------------------------------------------------


@pytest.fixture
def labelled(tmp_path):
    sheets = build_sheets(comparisons(), seed=11, pairs_per_comparison=6, shared=2, annotators=2)
    write_sheets(sheets, tmp_path / "he")
    labels = label_by_content(sheets)
    return sheets, tmp_path / "he" / "key.json", labels, tmp_path


def _one(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_collect_refuses_bad_input(labelled):
    sheets, key, labels, tmp = labelled
    first, second = sheets.key["annotators"]
    good = write_labels(tmp, sheets, labels)
    one, two = labels[first], labels[second]
    item = next(iter(one))
    other_item = next(i for i in two if i not in one)
    hidden = next(i for i, v in sheets.key["items"].items() if not v["annotators"] or first not in v["annotators"])
    body = {"sheet_id": sheets.sheet_id, "annotator": first}
    cases = {
        "other-sheet": ({**body, "sheet_id": "0123456789abcdef", "labels": one}, ["another sheet"]),
        "truncated": (json.dumps({**body, "labels": one})[:-20], ["truncated or malformed"]),
        "empty": ("", ["truncated or malformed"]),
        "not-an-object": ([1, 2], ["expected a JSON object"]),
        "no-labels-field": (body, ["missing labels"]),
        "missing-item": ({**body, "labels": {k: v for k, v in one.items() if k != item}}, [item, "no label"]),
        "unknown-item": ({**body, "labels": {**one, "i000000000000": "A"}}, ["unknown item i000000000000"]),
        "others-item": ({**body, "labels": {**one, other_item: "A"}}, [f"unknown item {other_item}", "another"]),
        "bad-label": ({**body, "labels": {**one, item: "left"}}, [f"item {item}", "'left'"]),
        "unknown-annotator": ({**body, "annotator": "mallory", "labels": one}, ["'mallory'"]),
        "duplicate-item": (
            json.dumps({**body, "labels": one})[:-2] + f', "{item}": "tie"}}}}',
            [f"item {item} is labelled twice"],
        ),
    }
    for name, (content, says) in cases.items():
        path = _one(tmp, f"{name}.json", content)
        with pytest.raises(LabelsError) as err:
            collect(key, [path, good[1]], tmp / "out")
        message = str(err.value)
        assert str(path) in message, (name, message)
        assert all(s in message for s in says), (name, message)
    assert hidden  # an item this annotator does not label exists, so "unknown" is a real case
    copy = _one(tmp, "copy.json", good[0].read_text())
    with pytest.raises(LabelsError, match=f"annotator {first} is labelled twice") as err:
        collect(key, [good[0], copy, good[1]], tmp / "out")
    assert str(copy) in str(err.value) and str(good[0]) in str(err.value)
    with pytest.raises(LabelsError, match=f"no labels file for annotator.*{second}"):
        collect(key, [good[0]], tmp / "out")
    with pytest.raises(LabelsError, match="different judges"):
        judged = _one(tmp, "judged.json", {**body, "labels": one, "judge": "some-llm"})
        collect(key, [judged, good[1]], tmp / "out")
    assert not (tmp / "out").exists()  # nothing written while any file is refused
    assert collect(key, good, tmp / "out").rows


def test_command_line(labelled, capsys):
    sheets, key, labels, tmp = labelled
    files = write_labels(tmp, sheets, labels)
    assert main(["collect", "--key", str(key), "--out", str(tmp / "tables"), *map(str, files)]) == 0
    assert {p.name for p in (tmp / "tables").iterdir()} >= {
        "table3.tex",
        "table3.csv",
        "table3.md",
        "table3_vs_paper.tex",
    }
    bad = _one(tmp, "bad.json", "{")
    assert main(["collect", "--key", str(key), "--out", str(tmp / "t2"), str(bad), str(files[1])]) == 2
    assert str(bad) in capsys.readouterr().err
    spec = {
        "comparisons": [
            {
                "name": n,
                "evaluated": a,
                "versus": b,
                "pairs": [
                    {
                        "prompt": p[0],
                        "evaluated_response": p[1],
                        "versus_response": p[2],
                        "evaluated_source": p[3],
                        "versus_source": p[4],
                    }
                    for p in pairs
                ],
            }
            for n, a, b, pairs in comparisons(n=8)
        ]
    }
    spec_path = _one(tmp, "comparisons.json", spec)
    assert (
        main(
            [
                "sheets",
                "--input",
                str(spec_path),
                "--out",
                str(tmp / "made"),
                "--pairs-per-comparison",
                "5",
                "--shared",
                "2",
                "--annotators",
                "2",
            ]
        )
        == 0
    )
    made = json.loads((tmp / "made" / "key.json").read_text())
    assert len(made["items"]) == 10
    assert (tmp / "made" / "annotators" / "annotator-2.html").is_file()


# --- collect: the paper's numbers back from synthetic labels -----------------------------------------------------


def paper_counts() -> dict[str, dict[str, int]]:
    ref = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))
    out: dict[str, dict[str, int]] = {}
    for e in ref["entries"]:
        if e["table"] == 3:
            out.setdefault(e["row"], {})[e["column"]] = int(e["value"])
    return out


def paper_agreement() -> tuple[float, float]:
    """57.7 and 84.4 as the slides print them (lines 303-304, kept in paper_tables/slide_lines.yaml)."""
    lines = yaml.safe_load(SLIDE_LINES.read_text(encoding="utf-8"))
    same = float(re.search(r"([\d.]+)%:\*\* Same annotations", lines[303]).group(1))
    none = float(re.search(r"([\d.]+)%:\*\* No contradiction", lines[304]).group(1))
    return same, none


def cut(value: float) -> float:
    return math.floor(value * 10 + 1e-9) / 10


def shared_patterns(pairs_total: int, same: int, contradictions: int, items: int) -> dict[str, int]:
    """How many shared items get each pattern of three labels so that the counts over annotator pairs come out:
    all three equal (3 same pairs), two equal and the odd one on the other side (1 same, 2 contradictions), two
    equal and a tie beside them or two ties (1 same, 0), all three different (0 same, 1 contradiction)."""
    for n3, n2c, n2t in itertools.product(range(items + 1), repeat=3):
        n1 = items - n3 - n2c - n2t
        if n1 >= 0 and 3 * n3 + n2c + n2t == same and 2 * n2c + n1 == contradictions:
            assert 3 * items == pairs_total
            return {"all_same": n3, "two_vs_other_side": n2c, "two_and_tie": n2t, "all_different": n1}
    raise AssertionError("no pattern of labels gives these counts")


def test_paper_numbers_back_from_synthetic_labels(tmp_path):
    counts = paper_counts()
    same_pct, free_pct = paper_agreement()
    sheets = build_sheets(paper_comparisons(identical_every=9), seed=2023)
    items = sheets.key["items"]
    names = sheets.key["annotators"]
    pairs_total = len([i for i, v in items.items() if v["shared"]]) * math.comb(len(names), 2)
    assert pairs_total == 90
    # The paper's percentages are counts over 90 annotator pairs cut after one decimal: find the counts.
    same = [k for k in range(pairs_total + 1) if cut(100 * k / pairs_total) == same_pct]
    free = [k for k in range(pairs_total + 1) if cut(100 * k / pairs_total) == free_pct]
    assert (len(same), len(free)) == (1, 1)
    same, free = same[0], free[0]
    contradictions = pairs_total - free

    def label_for(item_id: str, outcome: str) -> str:
        if outcome == "tie":
            return "tie"
        evaluated = items[item_id]["evaluated_shown_as"]
        return evaluated if outcome == "win" else ("B" if evaluated == "A" else "A")

    labels: dict[str, dict[str, str]] = {n: {} for n in names}
    for comparison, wanted in counts.items():
        mine = sorted(i for i, v in items.items() if v["comparison"] == comparison and not v["shared"])
        shown_here = [i for i in mine if not items[i]["identical"]]
        ties = wanted["tie"] - (len(mine) - len(shown_here))  # identical pairs are ties already
        outcomes = ["win"] * wanted["win"] + ["tie"] * ties + ["lose"] * wanted["lose"]
        assert len(outcomes) == len(shown_here)
        for item_id, result in zip(shown_here, outcomes):
            (annotator,) = items[item_id]["annotators"]
            labels[annotator][item_id] = label_for(item_id, result)
    plan = shared_patterns(pairs_total, same, contradictions, items=30)
    patterns = (["A", "A", "A"],) * plan["all_same"] + (["A", "A", "B"],) * plan["two_vs_other_side"]
    patterns += (["B", "B", "tie"],) * plan["two_and_tie"] + (["A", "tie", "B"],) * plan["all_different"]
    for item_id, given in zip(sorted(i for i, v in items.items() if v["shared"]), patterns, strict=True):
        for annotator, label in zip(names, given):
            labels[annotator][item_id] = label

    write_sheets(sheets, tmp_path / "he")
    files = write_labels(tmp_path, sheets, labels)
    table = collect(tmp_path / "he" / "key.json", files, tmp_path / "tables")
    for row in table.rows:
        assert row.counts == counts[row.comparison] and row.scored == 100
        assert row.paper == {k: float(v) for k, v in counts[row.comparison].items()}
        assert {k: round(v) for k, v in row.per100().items()} == counts[row.comparison]
    ag = table.agreement
    assert (ag.items, ag.annotator_pairs, ag.same, ag.contradictions) == (30, 90, same, contradictions)
    assert cut(ag.same_percent) == same_pct and cut(ag.no_contradiction_percent) == free_pct
    assert ag.same_percent == pytest.approx(100 * same / 90)
    assert ag.no_contradiction_percent == pytest.approx(100 * free / 90)
    # Fleiss' observed agreement is the same-annotation share: kappa from it and the label shares.
    shares = Counter(label for i, v in items.items() if v["shared"] for label in (labels[n][i] for n in names))
    chance = sum((c / 90) ** 2 for c in shares.values())
    assert ag.fleiss == pytest.approx((same / 90 - chance) / (1 - chance))
    assert set(ag.cohen) == {"annotator-1 / annotator-2", "annotator-1 / annotator-3", "annotator-2 / annotator-3"}

    out = tmp_path / "tables"
    assert {p.name for p in out.iterdir()} == {
        "table3.tex",
        "table3.csv",
        "table3.md",
        "table3_vs_paper.tex",
        "table3.json",
    }
    vs = (out / "table3_vs_paper.tex").read_text()
    assert "Judged by human annotators" in vs and r"RRHF$_{\mathrm{IP-2}}$" in vs
    assert "59 & 59 & 0 & 30 & 30 & 0 & 11 & 11 & 0" in vs and "0 & 0 & 0 & 90 & 90 & 0 & 10 & 10 & 0" in vs
    assert f"{same_pct:.1f} & {100 * same / 90:.1f}" in vs
    csv_rows = (out / "table3.csv").read_text().splitlines()
    assert csv_rows[0].startswith("comparison,A,B,evaluated,versus,judge,pairs,identical,win,tie,lose")
    assert csv_rows[2].startswith("rrhf_dp-vs-ppo,RRHF-DP,PPO,rrhf_dp,ppo,human annotators,100,")
    assert (
        "| RRHF-DP | Good responses | 100 | 59 (59) | 30 (30) | 11 (11) | 59 / 30 / 11 |"
        in (out / "table3.md").read_text()
    )
    # An automatic judge is named as one, and never captioned as people.
    judged = collect(tmp_path / "he" / "key.json", files, tmp_path / "judged", judge="qwen-judge_small")
    text = "".join((tmp_path / "judged" / n).read_text() for n in ("table3.tex", "table3_vs_paper.tex", "table3.md"))
    assert not judged.human and "Judged by human annotators" not in text
    assert r"Judged by qwen-judge\_small, an automatic judge (not human annotators)" in text


def test_judge_named_in_labels_files(labelled):
    sheets, key, labels, tmp = labelled
    files = write_labels(tmp, sheets, labels, judge="reward-model")
    table = collect(key, files, tmp / "t")
    assert table.judge == "reward-model" and not table.human
    assert "Judged by human annotators" not in (tmp / "t" / "table3.tex").read_text()
    with pytest.raises(LabelsError, match="say they come from 'reward-model'"):
        collect(key, files, judge="other")


def test_unparsed_from_a_judge_is_left_out_and_counted(labelled):
    sheets, key, labels, tmp = labelled
    first, second = sheets.key["annotators"]
    scored = next(i for i in labels[first] if not sheets.key["items"][i]["shared"])
    shared = next(i for i in labels[first] if sheets.key["items"][i]["shared"])
    marked = {first: {**labels[first], scored: "unparsed", shared: "unparsed"}, second: labels[second]}
    full = collect(key, write_labels(tmp / "full", sheets, labels, judge="some-llm"))
    table = collect(key, write_labels(tmp / "marked", sheets, marked, judge="some-llm"), tmp / "t")
    assert table.unparsed == 2 and full.unparsed == 0
    assert sum(r.scored for r in table.rows) == sum(r.scored for r in full.rows) - 1
    assert table.agreement.items == full.agreement.items - 1  # a shared item not every annotator judged
    text = "".join((tmp / "t" / n).read_text() for n in ("table3.tex", "table3.md", "table3_vs_paper.tex"))
    assert (
        text.count("2 labels without a readable verdict (unparsed) are left out") == 4
    )  # table3.tex, table3.md, both captions of _vs_paper
    assert json.loads((tmp / "t" / "table3.json").read_text())["unparsed"] == 2
    # People's files have no such entry; a missing item stays refused for every file.
    with pytest.raises(LabelsError, match="'unparsed' is not one of .*from an automatic judge"):
        collect(key, write_labels(tmp / "people", sheets, marked))
    lacking = {first: {k: v for k, v in labels[first].items() if k != scored}, second: labels[second]}
    with pytest.raises(LabelsError, match=f"first missing item: {scored}"):
        collect(key, write_labels(tmp / "lacking", sheets, lacking, judge="some-llm"))


def test_kappas_against_textbook_values():
    # Cohen: 50 items, both yes 20, yes/no 5, no/yes 10, both no 15 -> p_o 0.7, p_e 0.5, kappa 0.4.
    first = ["y"] * 25 + ["n"] * 25
    second = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["A"] * 5, ["A"] * 5) is None
    # Fleiss (1971)-style example: 10 items, 14 raters, 5 categories -> kappa 0.210.
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    ratings = [[c for c, n in enumerate(row) for _ in range(n)] for row in table]
    assert fleiss_kappa(ratings) == pytest.approx(0.2099, abs=1e-4)
    assert fleiss_kappa([["A"]]) is None and fleiss_kappa([]) is None


# --- the page (its HTML; the browser test drives it) ------------------------------------------------------------


def test_split_turns():
    text = (
        "\n\nHuman: How do I?\nIn two lines\n\nAssistant: Like this. Human: is not a turn here"
        "\n\nHuman: Ok\n\nAssistant:"
    )
    assert split_turns(text) == [
        {"speaker": "Human", "text": "How do I?\nIn two lines"},
        {"speaker": "Assistant", "text": "Like this. Human: is not a turn here"},
        {"speaker": "Human", "text": "Ok"},
    ]
    assert split_turns("Write a poem.") == [{"speaker": "", "text": "Write a poem."}]
    assert split_turns("Intro\nHuman: hi") == [{"speaker": "", "text": "Intro"}, {"speaker": "Human", "text": "hi"}]


def test_page_is_self_contained_and_escapes_text():
    evil = "</script><script>alert(1)</script><img src=x onerror=alert(2)> & \u2028"
    sheet = {
        "sheet_id": "abc123",
        "annotator": "annotator-1",
        "items": [
            {
                "id": "i000000000001",
                "prompt": f"\n\nHuman: {evil}\n\nAssistant:",
                "response_a": evil,
                "response_b": "fine",
            }
        ],
    }
    page = render_page(sheet)
    assert "<script>alert" not in page and "<img src=x" not in page and "</script><script>alert" not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", page)  # no network
    assert "<link" not in page and "@import" not in page and "http://" not in page and "https://" not in page
    data = re.search(r'<script type="application/json" id="sheet-data">(.*?)</script>', page, re.S).group(1)
    parsed = json.loads(data)
    assert parsed["items"][0]["a"] == evil and parsed["items"][0]["turns"][0]["text"] == evil.strip()
    assert "annotation-labels:" in page and "sheet.sheet_id" in page and "sheet.annotator" in page  # localStorage key
    for hook in (
        'id="label-A"',
        'id="label-tie"',
        'id="label-B"',
        'id="nav-prev"',
        'id="nav-next"',
        'id="download"',
        'id="progress"',
        'id="item"',
        "@media (max-width: 720px)",
    ):
        assert hook in page
