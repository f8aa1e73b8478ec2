"""paper_tables/reference.yaml: well formed, and every value is the number the slides print at its source.

The slide lines that hold the numbers are kept in the repository (paper_tables/slide_lines.yaml), so these
tests run in a clean clone and need nothing beside it; `python paper_tables/check_slide_lines.py <slides>`
checks the kept lines against a copy of the slides.
"""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "paper_tables" / "reference.yaml"
SLIDE_LINES = ROOT / "paper_tables" / "slide_lines.yaml"
SLIDES_NAME = "seed-rrhf-slides.txt"
TABLES = {2, 3, 5, 6, 7, 10}
MODELS = {"llama", "alpaca", "alpaca_sft", "gpt2_imdb", None}
SAMPLINGS = {
    "BP",
    "SP",
    "DP",
    "D",
    "P",
    "IP-1",
    "IP-2",
    "IP-3",
    "OP-32",
    "OP-32+KL",
    "OP-128",
    "OP-128+KL",
    "B",
    "none",
}
METHODS = {"rrhf", "ppo", "best_of_n", "sft", "none"}


@pytest.fixture(scope="module")
def reference():
    return yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def slides() -> list[str | None]:
    """The slides' lines as a list indexed from 0; lines not kept in the repository are None."""
    kept = yaml.safe_load(SLIDE_LINES.read_text(encoding="utf-8"))
    lines: list[str | None] = [None] * max(kept)
    for number, text in kept.items():
        lines[number - 1] = text
    return lines


def slide_line(slides, source: str) -> str:
    match = re.fullmatch(rf"{re.escape(SLIDES_NAME)}, line (\d+)", source)
    assert match, f"unexpected source {source!r}"
    return slides[int(match.group(1)) - 1]


def test_layout_and_fields(reference):
    assert set(reference) >= {"tables", "entries", "missing"}
    assert set(reference["tables"]) == TABLES
    seen = set()
    for entry in reference["entries"]:
        assert set(entry) == {"table", "row", "column", "value", "source"}, entry
        assert isinstance(entry["value"], int | float) and not isinstance(entry["value"], bool), entry
        table = reference["tables"][entry["table"]]
        assert entry["row"] in table["rows"], entry
        assert entry["column"] in table["columns"], entry
        lookup = (entry["table"], entry["row"], entry["column"])
        assert lookup not in seen, f"duplicate entry {lookup}"
        seen.add(lookup)
    assert all(isinstance(note, str) for note in reference["missing"])


def test_row_keys_use_harness_option_names(reference):
    for number, table in reference["tables"].items():
        for row_id, row in table["rows"].items():
            key = row["key"]
            assert key["model"] in MODELS, (number, row_id)
            assert key["sampling"] in SAMPLINGS, (number, row_id)
            # NLPO exists only as a quoted baseline of the IMDB table.
            assert key["method"] in METHODS or (number == 10 and key["method"] == "nlpo"), (number, row_id)
    rows7 = reference["tables"][7]["rows"]
    assert sorted(r["key"]["rank_weight"] for r in rows7.values()) == [0, 1]
    keys2 = [row["key"] for row in reference["tables"][2]["rows"].values()]
    assert {"model": "alpaca", "sampling": "DP", "method": "rrhf"} in keys2


def test_every_value_is_the_printed_cell(reference, slides):
    for entry in reference["entries"]:
        table = reference["tables"][entry["table"]]
        cells = slide_line(slides, entry["source"]).split("\t")
        n_labels = len(table["label_columns"])
        assert cells[:n_labels] == table["rows"][entry["row"]]["label"], entry
        printed = cells[n_labels + table["columns"].index(entry["column"])].strip()
        assert float(printed.rstrip("%")) == entry["value"], (entry, printed)


def test_precision_is_the_printed_decimals(reference, slides):
    # The values are floats (0.990 is kept as 0.99): each column's `precision` says how the slides print it,
    # and every number of the column is printed with exactly that many decimals.
    for number, table in reference["tables"].items():
        assert list(table["precision"]) == table["columns"], number
        assert re.fullmatch(rf"{re.escape(SLIDES_NAME)}, lines \d+-\d+", table["precision_source"]), number
    for entry in reference["entries"]:
        table = reference["tables"][entry["table"]]
        cells = slide_line(slides, entry["source"]).split("\t")
        printed = cells[len(table["label_columns"]) + table["columns"].index(entry["column"])].strip().rstrip("%")
        decimals = len(printed.partition(".")[2])
        assert decimals == table["precision"][entry["column"]], (entry, printed)


def test_headers_and_captions_as_printed(reference, slides):
    for table in reference["tables"].values():
        header = slide_line(slides, table["header_source"]).split("\t")
        assert header == table["label_columns"] + table["columns"]
        if table["caption"] is not None:
            assert slide_line(slides, table["caption_source"]) == table["caption"]


def test_no_printed_number_left_out(reference, slides):
    """Every cell of every row is an entry, or printed as '-' and named in `missing`."""
    have = {(e["table"], e["row"], e["column"]) for e in reference["entries"]}
    missing_text = "\n".join(reference["missing"])
    for number, table in reference["tables"].items():
        lines = {e["row"]: e["source"] for e in reference["entries"] if e["table"] == number}
        for row_id in table["rows"]:
            cells = slide_line(slides, lines[row_id]).split("\t")[len(table["label_columns"]) :]
            for column, cell in zip(table["columns"], cells, strict=True):
                if (number, row_id, column) not in have:
                    assert cell.strip() == "-", (number, row_id, column)
                    assert f"Table {number}, row {row_id}, column {column}:" in missing_text


def test_repeated_slides_agree(slides):
    # The slides print Tables 2 and 6 twice; the notes in the YAML say the copies are identical.
    assert slides[277:290] == slides[412:425]
    assert slides[343:359] == slides[372:388]


def test_spot_checks(reference, slides):
    values = {(e["table"], e["row"], e["column"]): e["value"] for e in reference["entries"]}
    text = "\n".join(line for line in slides if line is not None)
    spots = {
        (2, "bad_responses", "PPL"): ("121.29", 121.29),
        (2, "alpaca-rrhf-SP", "Reward"): ("-0.96", -0.96),
        (3, "rrhf_dp-vs-ppo", "tie"): ("48", 48),
        (5, "alpaca-rrhf-DP", "Accuracy"): ("61.75%", 61.75),
        (6, "alpaca-IP-3", "Max"): ("-0.65", -0.65),
        (6, "alpaca-OP-32", "Reward"): ("0.34", 0.34),
        (7, "alpaca-BP-no_rank", "Reward"): ("-1.14", -1.14),
        (10, "rrhf-OP-128-no_kl", "Reward"): ("0.990", 0.99),
    }
    for lookup, (printed, value) in spots.items():
        assert printed in text
        assert values[lookup] == value, lookup
    assert (2, "alpaca-best_of_4", "PPL") not in values
    assert (6, "alpaca-OP-32+KL", "Std.") not in values
