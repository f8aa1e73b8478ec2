"""Collect finished runs into the paper's tables, beside the paper's own numbers.

    python -m rrhf.tables results/ --out paper_tables/ [--strict] [--ppl exact]

Runs are found by the resolved config Hydra saved beside each `metrics.json` (never by folder names)
and matched to the rows of `paper_tables/reference.yaml` by their keys (model, sampling, method, ...).
A run made with another model or task than the paper's fills the row it stands in for (the model
config's `stands_in_for`), and every table says which model and task made each of our rows. Per table
this writes `tableN.tex` / `.csv` (our numbers, seeds averaged, spread reported) and
`tableN_vs_paper.tex` / `.csv` (paper, ours and the difference). Missing cells are dashes and are
listed; failed runs (a FAILED marker) are listed too.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rrhf import PROJECT_ROOT

log = logging.getLogger(__name__)

REFERENCE = PROJECT_ROOT / "paper_tables" / "reference.yaml"
IMDB_TABLES = {10}
LOWER_IS_BETTER = {"PPL", "Perplexity"}
NOT_RANKED = {"Std."}


@dataclass
class Observation:
    """One set of numbers that can fill a table row: a policy's evaluation, or the data set's."""

    key: dict[str, Any]  # model (paper name it stands for, per task family), sampling, method, ...
    ours: str  # which model and task really made it, for the table
    seed: int
    values: dict[str, float]
    artifact: str
    family: str  # hh | imdb | offline (the embedded task fills both families' tables)


@dataclass
class Collection:
    observations: list[Observation] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    train_logs: dict[str, Path] = field(default_factory=dict)  # run label -> log_history.json
    candidates: dict[str, Path] = field(default_factory=dict)  # sampling setting -> training file


def _values(metrics: dict, samples: dict | None, ppl: str) -> dict[str, float]:
    values = {"PPL": metrics.get(f"ppl_{ppl}"), "Perplexity": metrics.get(f"ppl_{ppl}"),
              "Reward": metrics.get("reward")}
    if "rm_accuracy_paper" in metrics:
        values["Accuracy"] = 100 * metrics["rm_accuracy_paper"]
    if samples:  # Table 6: statistics of the samples the policy generated (the data set's where none)
        stats = samples.get("sampled") or samples["all"]
        values |= {"Mean": stats["mean"], "Std.": stats["std"], "Max": stats["max"]}
    return {k: v for k, v in values.items() if v is not None}


def find_runs(results: Path, *, ppl: str = "paper") -> Collection:
    """Every observation the finished runs under `results` provide, and the runs that failed."""
    found = Collection()
    for config_file in sorted(Path(results).rglob(".hydra/config.yaml")):
        folder = config_file.parent.parent
        if (folder / "FAILED").exists():
            found.failed.append(f"{folder}: {(folder / 'FAILED').read_text().strip().splitlines()[-1]}")
            continue
        if not (folder / "metrics.json").exists():
            if (folder / "STARTED").exists():  # killed, or still running: never silently skipped
                found.failed.append(f"{folder}: started {(folder / 'STARTED').read_text().strip()}, not finished "
                                    "(killed, or still running)")
            continue
        cfg = OmegaConf.load(config_file)
        metrics = json.loads((folder / "metrics.json").read_text())
        family = cfg.task.get("family", "hh")
        stands_in = OmegaConf.to_container(cfg.model.get("stands_in_for") or {})
        model = {fam: stands_in.get(fam, cfg.model.name) for fam in ("hh", "imdb")}
        ours = f"{cfg.model.name} / {cfg.task.name}"

        def add(key: dict, values: dict, artifact: str, ours: str = ours, seed: int = cfg.seed,
                family: str = family) -> None:
            found.observations.append(Observation(key, ours, seed, values, artifact, family))

        add({"model": model, "sampling": "none", "method": "none"},
            _values(metrics["initial"], None, ppl), metrics["initial"]["artifact"])
        if cfg.method.name in ("best_of_n", "sft", "ppo"):  # no candidates of a sampling setting
            extra = {"n": cfg.method.n} if cfg.method.name == "best_of_n" else {}
            if cfg.method.name == "ppo":
                extra["kl_coef"] = float(cfg.method.ppo.init_kl_coef)
            add({"model": model, "sampling": "none", "method": cfg.method.name, **extra},
                _values(metrics["final"], None, ppl), metrics["final"]["artifact"])
        elif cfg.method.name != "none":
            train_args = cfg.method.get("train_args") or {}
            setting = {"hh": cfg.sampling.name, "imdb": cfg.sampling.get("table10_setting")}
            if cfg.sampling.get("table10_setting"):
                setting["hh"] = None  # an IMDB-appendix setting: not a row of the HH tables
            add({"model": model, "sampling": setting, "method": cfg.method.name,
                 "rank_weight": float(train_args.get("rank_weight", 1.0)),
                 "kl_coef": float(cfg.sampling.get("kl_coef") or 0.0)},
                _values(metrics["final"], metrics.get("samples"), ppl), metrics["final"]["artifact"])
        if metrics.get("train_log") and Path(metrics["train_log"]).exists():
            found.train_logs[f"{ours} {cfg.sampling.name} seed {cfg.seed} ({folder.name})"] = Path(metrics["train_log"])
        if metrics.get("candidates") and Path(metrics["candidates"]).exists():
            found.candidates[f"{cfg.sampling.name} / {ours}"] = Path(metrics["candidates"])
        for name, evaluated in metrics.get("dataset", {}).items():
            add({"model": None, "sampling": "none", "method": "none", "responses": f"dataset_{name}"},
                _values(evaluated, None, ppl), evaluated["artifact"], ours=f"data set / {cfg.task.name}")
        if "reward_model_accuracy" in metrics:
            scorer = cfg.reward.get("stands_in_for", cfg.reward.name)
            add({"model": None, "sampling": "none", "method": "none", "scorer": scorer},
                {"Accuracy": 100 * metrics["reward_model_accuracy"]}, f"rm:{cfg.reward.name}:{ours}",
                ours=f"{cfg.reward.name} / {cfg.task.name}")
    return found


def _matches(row_key: dict, obs: Observation, family: str) -> bool:
    if obs.family != "offline" and obs.family != family:
        return False
    # A row without a rank_weight is a row of the full loss: an ablated run never fills it.
    for name, wanted in ({"rank_weight": 1.0} | row_key).items():
        have = obs.key.get(name, 1.0 if name == "rank_weight" else None)
        if isinstance(have, dict):  # per task family
            have = have[family]
        if name == "rank_weight" or isinstance(wanted, float):
            if have is None or wanted is None or float(have) != float(wanted):
                return False
        elif have != wanted:
            return False
    return True


def _cells(observations: list[Observation], columns: list[str]) -> dict[str, tuple[float, float, int]]:
    """Per column: mean over seeds, their standard deviation (0 for one seed), and the seed count."""
    by_artifact = {o.artifact: o for o in observations}  # the same artifact seen from several runs
    out = {}
    for column in columns:
        values = [o.values[column] for o in by_artifact.values() if column in o.values]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            out[column] = (statistics.fmean(values), spread, len(values))
    return out


def build_table(number: int, spec: dict, entries: dict, observations: list[Observation]) -> pd.DataFrame:
    """One line per (paper row, our model/task): paper value, ours, spread, difference, per column."""
    family = "imdb" if number in IMDB_TABLES else "hh"
    records = []
    for row_id, row in spec["rows"].items():
        matching = [o for o in observations if _matches(row["key"], o, family)]
        groups: dict[str, list[Observation]] = {}
        for obs in matching:
            groups.setdefault(obs.ours, []).append(obs)
        for ours, group in sorted(groups.items()) or [("", [])]:
            cells = _cells(group, spec["columns"])
            record = {"row": row_id, **dict(zip(spec["label_columns"], row["label"])), "ours": ours}
            for column in spec["columns"]:
                paper = entries.get((number, row_id, column), math.nan)
                mean, spread, seeds = cells.get(column, (math.nan, math.nan, 0))
                record |= {f"{column} paper": paper, f"{column} ours": mean, f"{column} spread": spread,
                           f"{column} diff": mean - paper, f"{column} seeds": seeds}
            records.append(record)
    return pd.DataFrame.from_records(records)


def _latex_text(text: Any) -> str:
    text = str(text)
    text = text.replace("ρ", r"$\rho$").replace(r"\emptyset", r"$\emptyset$")
    text = re.sub(r"\s*_\{([^}]*)\}", lambda m: "$_{" + m.group(1).replace("_", r"\_") + "}$", text)
    text = re.sub(r"(?<![\\$])_", r"\_", text)
    return text.replace("%", r"\%").replace("&", r"\&").replace("#", r"\#")


def _sentence(text: str) -> str:
    return text if text.rstrip().endswith(".") else text + "."


def _number(value: float, spread: float = 0.0, seeds: int = 1) -> str:
    if value is None or math.isnan(value):
        return "--"
    return f"{value:.2f}" + (f" $\\pm$ {spread:.2f}" if seeds > 1 else "")


def _tabular(header: list[str], lines: list[list[str]], n_labels: int, caption: str, label: str) -> str:
    spec = "l" * n_labels + "r" * (len(header) - n_labels)
    body = "\n".join(" & ".join(cells) + r" \\" for cells in lines)
    return (f"\\begin{{table}}[t]\n\\centering\n\\caption{{{_latex_text(caption)}}}\n\\label{{{label}}}\n"
            f"\\begin{{tabular}}{{{spec}}}\n\\toprule\n{' & '.join(header)} \\\\\n\\midrule\n{body}\n"
            "\\bottomrule\n\\end{tabular}\n\\end{table}\n")


def ours_latex(number: int, spec: dict, frame: pd.DataFrame, ppl: str) -> str:
    """Our numbers in the paper's column order, the best of each column in bold."""
    ours = frame[frame["ours"] != ""]
    best = {}
    for column in spec["columns"]:
        values = ours[f"{column} ours"].dropna()
        if column not in NOT_RANKED and len(values) > 1:
            best[column] = values.min() if column in LOWER_IS_BETTER else values.max()
    lines = []
    for _, r in ours.iterrows():
        cells = [_latex_text(r[c]) for c in spec["label_columns"]] + [_latex_text(r["ours"])]
        for column in spec["columns"]:
            text = _number(r[f"{column} ours"], r[f"{column} spread"], r[f"{column} seeds"])
            cells.append(f"\\textbf{{{text}}}" if best.get(column) == r[f"{column} ours"] else text)
        lines.append(cells)
    header = [_latex_text(c) or "Method" for c in spec["label_columns"]] + ["Model / task (ours)"]
    header += [_latex_text(c) for c in spec["columns"]]
    caption = (f"{_sentence(spec.get('caption') or spec['name'])} Our runs; rows name the model and task that made "
               f"them. PPL in {ppl} mode; mean $\\pm$ std over seeds where there are several.")
    return _tabular(header, lines, len(spec["label_columns"]) + 1, caption, f"tab:table{number}")


def side_by_side_latex(number: int, spec: dict, frame: pd.DataFrame, ppl: str) -> str:
    """Every paper row with the paper's value, ours and the difference; a dash where either is missing."""
    lines = []
    for _, r in frame.iterrows():
        cells = [_latex_text(r[c]) for c in spec["label_columns"]] + [_latex_text(r["ours"]) or "--"]
        for column in spec["columns"]:
            cells += [_number(r[f"{column} paper"]), _number(r[f"{column} ours"]), _number(r[f"{column} diff"])]
        lines.append(cells)
    header = [_latex_text(c) or "Method" for c in spec["label_columns"]] + ["Ours from"]
    for column in spec["columns"]:
        header += [f"{_latex_text(column)} paper", "ours", r"$\Delta$"]
    caption = (f"{_sentence(spec.get('caption') or spec['name'])} Paper and ours side by side (PPL in {ppl} mode); "
               "ours come from the model and task named in each row.")
    return _tabular(header, lines, len(spec["label_columns"]) + 1, caption, f"tab:table{number}-vs-paper")


def collate(results: Path, out: Path, *, reference: Path = REFERENCE, ppl: str = "paper",
            strict: bool = False) -> list[Path]:
    """Write every table that at least one finished run fills; return the files written."""
    ref = yaml.safe_load(reference.read_text())
    entries = {(e["table"], e["row"], e["column"]): float(e["value"]) for e in ref["entries"]}
    found = find_runs(results, ppl=ppl)
    out.mkdir(parents=True, exist_ok=True)
    written, missing = [], []
    for number, spec in ref["tables"].items():
        if spec.get("reference_only"):
            continue
        frame = build_table(number, spec, entries, found.observations)
        if frame.empty or (frame["ours"] == "").all():
            continue
        for _, r in frame[frame["ours"] != ""].iterrows():
            missing += [f"Table {number}, row {r['row']} ({r['ours']}), column {c}: no value"
                        for c in spec["columns"] if math.isnan(r[f"{c} ours"])]
        missing += [f"Table {number}, row {r['row']}: no run" for _, r in frame.iterrows() if r["ours"] == ""]
        files = {f"table{number}.tex": ours_latex(number, spec, frame, ppl),
                 f"table{number}.csv": frame[frame["ours"] != ""].to_csv(index=False),
                 f"table{number}_vs_paper.tex": side_by_side_latex(number, spec, frame, ppl),
                 f"table{number}_vs_paper.csv": frame.to_csv(index=False)}
        for name, text in files.items():
            (out / name).write_text(text)
            written.append(out / name)
    written += _plots(found, out / "plots")
    report = ["# Cells without a value in the tables written", *missing, "", "# Failed runs", *found.failed]
    (out / "missing.txt").write_text("\n".join(report) + "\n")
    log.info("collate: %d observations, %d failed runs -> %d files in %s; %d missing cells (see %s)",
             len(found.observations), len(found.failed), len(written), out, len(missing), out / "missing.txt")
    for line in found.failed:
        log.warning("failed run: %s", line)
    if strict and (missing or found.failed):
        raise SystemExit(f"collate --strict: {len(missing)} missing cells, {len(found.failed)} failed runs "
                         f"(listed in {out / 'missing.txt'})")
    return written


def _plots(found: Collection, out: Path) -> list[Path]:
    """Training curves per run and the reward distribution of each setting's candidates (PNG)."""
    from rrhf.plots import candidate_scores, reward_distributions, training_curves

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for label, log_file in sorted(found.train_logs.items()):
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")
        written.append(training_curves(json.loads(log_file.read_text()), label, out / f"train_{name}.png"))
    if found.candidates:
        scores = {label: candidate_scores(path) for label, path in found.candidates.items()}
        written.append(reward_distributions(scores, out / "candidate_rewards.png"))
    return written


class CollateCallback(Callback):
    """Collate the tables when a multirun ends (Hydra skips this when a job failed: use the command)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("collate", True):
            collate(Path(config.paths.results), Path(config.paths.tables))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="folder holding the runs (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("paper_tables"))
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--ppl", choices=("paper", "exact"), default="paper", help="which perplexity to show")
    parser.add_argument("--strict", action="store_true", help="fail when a cell is missing or a run failed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for path in collate(args.results, args.out, reference=args.reference, ppl=args.ppl, strict=args.strict):
        print(path)


if __name__ == "__main__":
    main()
