"""The human evaluation of Table 3: blind sheets, the annotation page, and collecting the labels into the table.

    sheets = build_sheets(comparisons, seed=0)          # Table 3's design: 3 x 110 pairs, 30 shared, 3 annotators
    write_sheets(sheets, "humaneval/")                  # key.json + annotators/<name>.json
    write_pages(sheets, "humaneval/")                   # annotators/<name>.html, one self-contained page each
    collect("humaneval/key.json", label_files, "paper_tables/")   # table3.{tex,csv,md,json}, table3_vs_paper.tex

No model is loaded here: the responses come from runs' artifacts, and the labels from people (or a judge that
writes the same label files).
"""

from rrhf.humaneval.page import render_page, split_turns, write_pages
from rrhf.humaneval.sheets import (
    PAPER_COMPARISONS,
    Comparison,
    Pair,
    Sheets,
    build_sheets,
    write_sheets,
)
from rrhf.humaneval.table3 import (
    LabelsError,
    Table3,
    cohen_kappa,
    collect,
    fleiss_kappa,
    tally,
)

__all__ = [
    "PAPER_COMPARISONS",
    "Comparison",
    "LabelsError",
    "Pair",
    "Sheets",
    "Table3",
    "build_sheets",
    "cohen_kappa",
    "collect",
    "fleiss_kappa",
    "render_page",
    "split_turns",
    "tally",
    "write_pages",
    "write_sheets",
]
