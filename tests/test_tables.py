"""The collator: runs found by their resolved config, matched to the paper's rows, seeds averaged,
missing cells and failed runs listed, every table written every time, captions that name the judge and
reward model of the runs, CSV numbers as printed, and every .tex compiles with pdflatex."""

import csv
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from fixtures.latex import compile_table
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import rrhf  # noqa: F401  (registers the config resolvers)
from rrhf.tables import REFERENCE, collate

TABLES = [2, 5, 6, 7, 10]  # every table a run can fill (Table 3 is human evaluation, reference only)
SLIDE_LINES = REFERENCE.parent / "slide_lines.yaml"  # the slide lines the paper's numbers are read from

CONF = Path(__file__).resolve().parents[1] / "conf"


def _fake_run(folder: Path, overrides: list[str], reward: float, *, failed: bool = False) -> None:
    """A run folder as Hydra and the pipeline leave it, with made-up metrics."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        OmegaConf.set_struct(cfg, False)
        del cfg["hydra"]
        OmegaConf.resolve(cfg)
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    if failed:
        (folder / "FAILED").write_text("Traceback ...\nRuntimeError: out of memory\n")
        return
    evaluation = {
        "reward": reward,
        "ppl_paper": 10.0 + reward,
        "ppl_exact": 20.0,
        "rm_accuracy_paper": 0.5,
        "artifact": f"{folder}/eval",
    }
    initial = {
        "reward": -1.0,
        "ppl_paper": 12.0,
        "ppl_exact": 30.0,
        "rm_accuracy_paper": 0.4,
        "artifact": "initial-eval",
    }  # the same artifact for every run of the model
    samples = {"all": {"mean": -0.5, "std": 0.25, "max": 0.5}, "sampled": {"mean": -0.6, "std": 0.2, "max": 0.4}}
    (folder / "metrics.json").write_text(
        json.dumps({"initial": initial, "trained": evaluation, "final": evaluation, "samples": samples})
    )


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    _fake_run(root / "dp1", ["sampling=DP", "seed=1"], reward=0.25)
    _fake_run(root / "dp2", ["sampling=DP", "seed=2"], reward=0.75)
    _fake_run(root / "bp", ["sampling=BP"], reward=0.1)
    _fake_run(root / "bp_norank", ["sampling=BP", "method.train_args.rank_weight=0"], reward=0.0)
    _fake_run(root / "p", ["sampling=P"], reward=0.0, failed=True)
    return root


def test_table6_rows_are_filled_beside_the_paper(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    collate(results, out)
    frame = pd.read_csv(out / "table6_vs_paper.csv")
    dp = frame[frame["row"] == "alpaca-DP"].iloc[0]
    assert dp["ours"] == "smollm2 / imdb_offline"  # says which model and task made it
    assert dp["judge"] == "embedded:gemma3" and dp["reward"] == "vader"  # and what measured it
    assert dp["Reward ours"] == pytest.approx(0.5) and dp["Reward seeds"] == 2
    assert dp["Reward spread"] == 0.35  # stdev of 0.25 and 0.75 (0.3536), as the table prints it
    # All training candidates, the data set's included, as the paper's statistics are.
    assert dp["Mean ours"] == -0.5 and dp["Std. ours"] == 0.25 and dp["Max ours"] == 0.5
    reference = yaml.safe_load(REFERENCE.read_text())
    paper = {(e["row"], e["column"]): e["value"] for e in reference["entries"] if e["table"] == 6}
    assert dp["Reward paper"] == paper[("alpaca-DP", "Reward")]
    assert dp["Reward diff"] == round(0.5 - paper[("alpaca-DP", "Reward")], 2)
    # The ablated run fills Table 7's "- L_rank" row and never Table 6's BP row.
    bp = frame[frame["row"] == "alpaca-BP"].iloc[0]
    assert bp["Reward ours"] == pytest.approx(0.1)
    table7 = pd.read_csv(out / "table7.csv").set_index("row")
    assert table7.loc["alpaca-BP-no_rank", "Reward ours"] == 0.0
    assert table7.loc["alpaca-BP", "Reward ours"] == pytest.approx(0.1)


def test_table6_statistics_of_the_sampled_candidates_on_request(results: Path, tmp_path: Path) -> None:
    collate(results, tmp_path / "tables", samples="sampled")
    dp = pd.read_csv(tmp_path / "tables" / "table6.csv").set_index("row").loc["alpaca-DP"]
    assert (dp["Mean ours"], dp["Std. ours"], dp["Max ours"]) == (-0.6, 0.2, 0.4)
    assert "generated training candidates only" in (tmp_path / "tables" / "table6.tex").read_text()


def test_csv_numbers_are_rounded_as_printed(results: Path, tmp_path: Path) -> None:
    collate(results, tmp_path / "tables")
    tex = (tmp_path / "tables" / "table2.tex").read_text()
    tables = yaml.safe_load(REFERENCE.read_text())["tables"]
    for n, kind in ((n, kind) for n in TABLES for kind in ("", "_vs_paper")):
        frame = pd.read_csv(tmp_path / "tables" / f"table{n}{kind}.csv", dtype=str, keep_default_na=False)
        parts = ("paper", "ours", "spread", "diff") if kind else ("ours", "spread")
        for column, digits in tables[n]["precision"].items():
            # Every number of a column with the decimals the paper prints it with, trailing zeros kept.
            pattern = r"-?\d+\." + r"\d" * digits if digits else r"-?\d+"
            for part in parts:
                cells = frame[f"{column} {part}"][frame[f"{column} {part}"] != ""]
                assert cells.str.fullmatch(pattern).all(), (n, kind, column, part, list(cells))
    dp = pd.read_csv(tmp_path / "tables" / "table2.csv").set_index("row").loc["alpaca-rrhf-DP"]
    # The DP runs' PPL: 10.25 and 10.75, stdev 0.3536; the CSV holds what the .tex prints.
    assert (dp["PPL ours"], dp["PPL spread"]) == (10.5, 0.35) and "10.50 $\\pm$ 0.35" in tex


def test_every_table_every_time(tmp_path: Path) -> None:
    # Nothing has run yet: every table and its comparison are still written, dashes in every cell of ours.
    empty = tmp_path / "results"
    empty.mkdir()
    written = {p.name for p in collate(empty, tmp_path / "tables")}
    for n in TABLES:
        assert {f"table{n}.tex", f"table{n}.csv", f"table{n}_vs_paper.tex", f"table{n}_vs_paper.csv"} <= written
        frame = pd.read_csv(tmp_path / "tables" / f"table{n}.csv", keep_default_na=False)
        assert len(frame) == len(yaml.safe_load(REFERENCE.read_text())["tables"][n]["rows"])
        assert set(frame["ours"]) == {""}
    assert "Table 10, row rrhf-BP: no run" in (tmp_path / "tables" / "missing.txt").read_text()
    collate(empty, tmp_path / "tables", strict=True)  # no table is filled, so none is incomplete


def test_captions_name_the_judge_and_reward_model_of_the_runs(tmp_path: Path) -> None:
    root = tmp_path / "results"
    _fake_run(root / "offline", ["sampling=DP"], reward=0.5)
    collate(root, tmp_path / "tables")
    tex = (tmp_path / "tables" / "table2.tex").read_text()
    assert "Ours: perplexity by embedded:gemma3, reward by vader." in tex
    assert "The paper: perplexity by gpt2-medium, reward by Dahoas/gptj-rm-static." in tex
    assert " & embedded:gemma3 & vader \\\\\n" in tex  # under the PPL and Reward headers
    # A second run measured with the paper's judge and reward model: each row names its own.
    _fake_run(root / "hh", ["sampling=DP", "eval=hh", "reward=gptj_rm_static", "seed=7"], reward=0.1)
    collate(root, tmp_path / "tables")
    tex = (tmp_path / "tables" / "table6_vs_paper.tex").read_text()
    assert "perplexity by the model named in each row, reward by the model named in each row" in tex
    assert "PPL judge & Reward model" in tex
    frame = pd.read_csv(tmp_path / "tables" / "table6_vs_paper.csv")
    dp = frame[frame["row"] == "alpaca-DP"].set_index("judge")
    # Never averaged across judges: one line per judge and reward model.
    assert dp.loc["gpt2-medium", "reward"] == "Dahoas/gptj-rm-static" and dp.loc["gpt2-medium", "Reward ours"] == 0.1
    assert dp.loc["embedded:gemma3", "Reward ours"] == 0.5
    assert "textbf" not in (tmp_path / "tables" / "table2.tex").read_text()  # no best across reward models


def test_missing_cells_and_failed_runs_are_listed(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    collate(results, out)
    report = (out / "missing.txt").read_text()
    assert "Table 6, row llama-DP: no run" in report
    assert "out of memory" in report and str(results / "p") in report
    vs_paper = (out / "table6_vs_paper.tex").read_text()
    assert "--" in vs_paper
    assert "Table 10, row rrhf-BP: no run" in report  # tables no run fills are listed too
    with pytest.raises(SystemExit, match="missing cells"):
        collate(results, out, strict=True)


def test_best_value_is_bold(results: Path, tmp_path: Path) -> None:
    collate(results, tmp_path / "tables")
    tex = (tmp_path / "tables" / "table6.tex").read_text()
    assert r"\textbf{0.50 $\pm$ 0.35}" in tex  # the highest reward among our rows


def _slide_cells(number: int) -> list[list[str]]:
    """Per row of reference table `number`, in its order: the number cells of the slide line the row comes
    from, as the slides print them (the % of Table 5's accuracy dropped: the tables print the number)."""
    reference = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))
    kept = yaml.safe_load(SLIDE_LINES.read_text(encoding="utf-8"))
    spec = reference["tables"][number]
    sources = {e["row"]: e["source"] for e in reference["entries"] if e["table"] == number}
    rows = []
    for row_id, row in spec["rows"].items():
        cells = kept[int(re.fullmatch(r"seed-rrhf-slides\.txt, line (\d+)", sources[row_id]).group(1))].split("\t")
        assert cells[: len(spec["label_columns"])] == row["label"], (number, row_id)  # the row's own line
        rows.append([cell.strip().removesuffix("%") for cell in cells[len(spec["label_columns"]) :]])
    return rows


def _tex_rows(tex: str) -> list[list[str]]:
    """The body cells of a generated booktabs table, row by row."""
    body = tex.split("\\midrule\n", 1)[1].split("\\bottomrule", 1)[0]
    return [line.strip().removesuffix("\\\\").strip().split(" & ") for line in body.strip().splitlines()]


def test_every_table_with_paper_numbers_is_checked_as_printed() -> None:
    tables = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))["tables"]
    assert sorted(n for n, spec in tables.items() if not spec.get("reference_only")) == TABLES


@pytest.mark.parametrize("number", TABLES)
def test_paper_cells_read_as_the_slides_print_them(number: int, tmp_path: Path) -> None:
    # No run: the comparison table holds the paper's numbers alone, one line per paper row in the paper's order.
    empty = tmp_path / "results"
    empty.mkdir()
    collate(empty, tmp_path / "tables")
    spec = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))["tables"][number]
    slides = _slide_cells(number)
    tex = _tex_rows((tmp_path / "tables" / f"table{number}_vs_paper.tex").read_text())
    with open(tmp_path / "tables" / f"table{number}_vs_paper.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(tex) == len(csv_rows) == len(slides) == len(spec["rows"])
    first = len(spec["label_columns"]) + 1  # the label cells, then the model and task of ours
    for printed, tex_row, csv_row in zip(slides, tex, csv_rows, strict=True):
        for j, column in enumerate(spec["columns"]):
            absent = printed[j] == "-"
            assert tex_row[first + 3 * j] == ("--" if absent else printed[j]), (number, csv_row["row"], column)
            assert csv_row[f"{column} paper"] == ("" if absent else printed[j]), (number, csv_row["row"], column)


def test_our_cells_and_differences_take_the_paper_precision(tmp_path: Path) -> None:
    root = tmp_path / "results"
    _fake_run(root / "imdb_bp", ["sampling=imdb_BP"], reward=0.123456)
    _fake_run(root / "dp", ["sampling=DP"], reward=0.123456)
    out = tmp_path / "tables"
    collate(root, out)
    # Table 10 prints three decimals: reward 0.123456 against the paper's 0.861, PPL 10.123456 against 32.083.
    rows = pd.read_csv(out / "table10_vs_paper.csv")["row"].tolist()
    bp = _tex_rows((out / "table10_vs_paper.tex").read_text())[rows.index("rrhf-BP")]
    assert bp[-6:] == ["0.861", "0.123", "-0.738", "32.083", "10.123", "-21.960"]
    best = [r"\textbf{0.123}", r"\textbf{10.123}"]  # above the initial policy's -1 and below its 12
    assert _tex_rows((out / "table10.tex").read_text())[rows.index("rrhf-BP")][-2:] == best
    ours = pd.read_csv(out / "table10.csv", dtype=str, keep_default_na=False).set_index("row").loc["rrhf-BP"]
    assert (ours["Reward ours"], ours["Perplexity ours"]) == ("0.123", "10.123")
    # Table 6 prints two: the same run values, against Alpaca DP's -1.02 and 14.75.
    rows = pd.read_csv(out / "table6_vs_paper.csv")["row"].tolist()
    dp = _tex_rows((out / "table6_vs_paper.tex").read_text())[rows.index("alpaca-DP")]
    assert dp[-15:-9] == ["14.75", "10.12", "-4.63", "-1.02", "0.12", "1.14"]


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (Debian texlive-latex-base)")
def test_every_table_compiles_with_pdflatex(results: Path, tmp_path: Path) -> None:
    # One run measured with the paper's judge and reward model: the tables name them per row.
    _fake_run(results / "hh", ["sampling=BP", "eval=hh", "reward=gptj_rm_static"], reward=0.2)
    written = collate(results, tmp_path / "tables")
    assert "PPL judge & Reward model" in (tmp_path / "tables" / "table6.tex").read_text()
    tex_files = [p for p in written if p.suffix == ".tex"]
    assert len(tex_files) == 2 * len(TABLES)
    for tex in tex_files:
        result = compile_table(tex, tmp_path)
        assert result.returncode == 0, f"{tex.name}:\n{result.stdout[-2000:]}"
