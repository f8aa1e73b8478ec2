"""Command line of the human evaluation (Table 3).

python -m rrhf.humaneval sheets --input comparisons.json --out DIR [--seed N] [--pairs-per-comparison N]
                                [--shared N] [--annotators N]
python -m rrhf.humaneval collect --key DIR/key.json --out paper_tables/ [--judge NAME] LABELS.json...
python -m rrhf.humaneval sheets-from-runs RESULTS_DIR [--out DIR]     # a Table 3 sweep's runs (rrhf.humaneval.runs)
python -m rrhf.humaneval judge-reward-model RESULTS_DIR [--sheets DIR] [--margin X] [--out paper_tables/]
"""

from __future__ import annotations

import argparse
import sys

from rrhf.humaneval.page import write_pages
from rrhf.humaneval.sheets import (
    PAPER_ANNOTATORS,
    PAPER_PAIRS_PER_COMPARISON,
    PAPER_SHARED,
    build_sheets,
    read_comparisons,
    write_sheets,
)
from rrhf.humaneval.table3 import LabelsError, collect


def _pairs(text: str) -> int | None:
    return None if text == "all" else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rrhf.humaneval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("sheets", help="draw the pairs and write the key, the sheets and the pages")
    make.add_argument("--input", required=True, help="JSON: {comparisons: [{name, evaluated, versus, pairs}]}")
    make.add_argument("--out", required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument(
        "--pairs-per-comparison",
        type=_pairs,
        default=PAPER_PAIRS_PER_COMPARISON,
        help=f"pairs drawn per comparison, or 'all' (default {PAPER_PAIRS_PER_COMPARISON}, Table 3's)",
    )
    make.add_argument("--shared", type=int, default=PAPER_SHARED)
    make.add_argument("--annotators", type=int, default=PAPER_ANNOTATORS)
    gather = commands.add_parser("collect", help="check the labels files and write Table 3")
    gather.add_argument("--key", required=True)
    gather.add_argument("--out", required=True)
    gather.add_argument(
        "--judge", default=None, help="who labelled, for the captions, when not people (e.g. an LLM judge's name)"
    )
    gather.add_argument("labels", nargs="+")
    from_runs = commands.add_parser("sheets-from-runs", help="the sheets of a Table 3 sweep's finished runs")
    from_runs.add_argument("results", help="the sweep folder (results/offline_table3, results/table3)")
    from_runs.add_argument("--out", default=None, help="where the sheets are copied (default RESULTS_DIR/table3)")
    reward_judge = commands.add_parser("judge-reward-model", help="label the sheets with the runs' reward")
    reward_judge.add_argument("results", help="the sweep folder (results/offline_table3, results/table3)")
    reward_judge.add_argument("--sheets", default=None, help="the sheets folder (default: built from the runs)")
    reward_judge.add_argument("--margin", type=float, default=None, help="tie margin (default table3.reward_margin)")
    reward_judge.add_argument("--out", default="paper_tables")
    args = parser.parse_args(argv)

    try:
        if args.command == "sheets":
            sheets = build_sheets(
                read_comparisons(args.input),
                seed=args.seed,
                pairs_per_comparison=args.pairs_per_comparison,
                shared=args.shared,
                annotators=args.annotators,
            )
            written = write_sheets(sheets, args.out)
            pages = write_pages(sheets, args.out)
            print(f"sheet {sheets.sheet_id}: key {written['key']} (keep it from the annotators); pages:")
            for name, path in pages.items():
                print(f"  {name}: {path} ({len(sheets.annotator_sheets[name]['items'])} pairs)")
        elif args.command == "collect":
            table = collect(args.key, args.labels, args.out, judge=args.judge)
            for path in table.files:
                print(path)
        else:
            from rrhf.humaneval.runs import judge_with_reward, sheets_from_runs

            if args.command == "sheets-from-runs":
                sheets_from_runs(args.results, args.out)
            else:
                sheets = args.sheets or sheets_from_runs(args.results)
                judge_with_reward(args.results, sheets, args.out, margin=args.margin)
    except (LabelsError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
