"""The collator: runs found by their resolved config, matched to the paper's rows, seeds averaged,
missing cells and failed runs listed, and every .tex compiles with pdflatex."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import rrhf  # noqa: F401  (registers the config resolvers)
from rrhf.tables import REFERENCE, collate

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
    evaluation = {"reward": reward, "ppl_paper": 10.0 + reward, "ppl_exact": 20.0, "rm_accuracy_paper": 0.5,
                  "artifact": f"{folder}/eval"}
    initial = {"reward": -1.0, "ppl_paper": 12.0, "ppl_exact": 30.0, "rm_accuracy_paper": 0.4,
               "artifact": "initial-eval"}  # the same artifact for every run of the model
    samples = {"all": {"mean": -0.5, "std": 0.25, "max": 0.5}, "sampled": {"mean": -0.6, "std": 0.2, "max": 0.4}}
    (folder / "metrics.json").write_text(json.dumps(
        {"initial": initial, "trained": evaluation, "final": evaluation, "samples": samples}))


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
    import pandas as pd

    frame = pd.read_csv(out / "table6_vs_paper.csv")
    dp = frame[frame["row"] == "alpaca-DP"].iloc[0]
    assert dp["ours"] == "smollm2 / imdb_offline"  # says which model and task made it
    assert dp["Reward ours"] == pytest.approx(0.5) and dp["Reward seeds"] == 2
    assert dp["Reward spread"] == pytest.approx(0.35355, abs=1e-4)  # stdev of 0.25 and 0.75
    assert dp["Mean ours"] == -0.6 and dp["Std. ours"] == 0.2 and dp["Max ours"] == 0.4  # sampled candidates
    reference = yaml.safe_load(REFERENCE.read_text())
    paper = {(e["row"], e["column"]): e["value"] for e in reference["entries"] if e["table"] == 6}
    assert dp["Reward paper"] == paper[("alpaca-DP", "Reward")]
    assert dp["Reward diff"] == pytest.approx(0.5 - paper[("alpaca-DP", "Reward")])
    # The ablated run fills Table 7's "- L_rank" row and never Table 6's BP row.
    bp = frame[frame["row"] == "alpaca-BP"].iloc[0]
    assert bp["Reward ours"] == pytest.approx(0.1)
    table7 = pd.read_csv(out / "table7.csv").set_index("row")
    assert table7.loc["alpaca-BP-no_rank", "Reward ours"] == 0.0
    assert table7.loc["alpaca-BP", "Reward ours"] == pytest.approx(0.1)


def test_missing_cells_and_failed_runs_are_listed(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    collate(results, out)
    report = (out / "missing.txt").read_text()
    assert "Table 6, row llama-DP: no run" in report
    assert "out of memory" in report and str(results / "p") in report
    vs_paper = (out / "table6_vs_paper.tex").read_text()
    assert "--" in vs_paper
    with pytest.raises(SystemExit, match="missing cells"):
        collate(results, out, strict=True)


def test_best_value_is_bold(results: Path, tmp_path: Path) -> None:
    collate(results, tmp_path / "tables")
    tex = (tmp_path / "tables" / "table6.tex").read_text()
    assert r"\textbf{0.50 $\pm$ 0.35}" in tex  # the highest reward among our rows


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (Debian texlive-latex-base)")
def test_every_table_compiles_with_pdflatex(results: Path, tmp_path: Path) -> None:
    written = collate(results, tmp_path / "tables")
    tex_files = [p for p in written if p.suffix == ".tex"]
    assert len(tex_files) >= 4
    for tex in tex_files:
        document = tmp_path / f"doc_{tex.stem}.tex"
        document.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                            f"\\input{{{tex}}}\n\\end{{document}}\n")
        result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{tex.name}:\n{result.stdout[-2000:]}"
