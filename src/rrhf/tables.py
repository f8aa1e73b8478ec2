"""Collect finished runs into the paper's tables, beside the paper's own numbers.

    python -m rrhf.tables results/ --out paper_tables/ [--strict] [--force] [--ppl exact] [--samples sampled]

Runs are found by the resolved config Hydra saved beside each `metrics.json` (never by folder names)
and matched to the rows of `paper_tables/reference.yaml` by their keys (model, sampling, method, ...).
A run made with another model or task than the paper's fills the row it stands in for (the model
config's `stands_in_for`), and every table says which model and task made each of our rows, and which
perplexity judge and reward model measured them (from the run's config; per row where runs differ).
Every table (2, 5, 6, 7, 10) is written on every collation: `tableN.tex` / `.csv` (our numbers, seeds
averaged, spread reported) and `tableN_vs_paper.tex` / `.csv` (paper, ours and the difference), with
dashes where no run exists. The CSV files hold the numbers rounded as the tables print them. Missing
cells are listed in `missing.txt`; failed runs (a FAILED marker, or a metrics.json that cannot be read) are
listed too. A results folder that does not exist is refused, and so are tables with fewer filled cells than
the ones they would replace, unless --force.
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
# Each column is printed, ours and the paper's alike, with the decimals the paper prints it with: reference.yaml's
# `precision` per table (Tables 2, 5, 6, 7: two decimals; Table 10, the IMDB appendix: three), so that a paper
# cell reads as the paper prints it (0.990, 32.083, not 0.99, 32.08) and ours compare with it digit for digit.
# What measured each column: the perplexity judge or the reward model (Accuracy is the policy's own score,
# or the reward model's for the row that names it).
MEASURED_BY = {
    "PPL": "judge",
    "Perplexity": "judge",
    "Reward": "reward",
    "Mean": "reward",
    "Std.": "reward",
    "Max": "reward",
}
MEASURE_NAMES = {"judge": "perplexity", "reward": "reward"}  # in captions
PER_ROW_HEADER = {"judge": "PPL judge", "reward": "Reward model"}  # the column naming it where rows differ
SAMPLE_SETS = ("all", "sampled")  # Table 6's statistics: every training candidate, or the generated ones only


@dataclass
class Observation:
    """One set of numbers that can fill a table row: a policy's evaluation, or the data set's."""

    key: dict[str, Any]  # model (paper name it stands for, per task family), sampling, method, ...
    ours: str  # which model and task really made it, for the table
    seed: int
    values: dict[str, float]
    artifact: str
    family: str  # hh | imdb | offline (the embedded task fills both families' tables)
    measured: dict[str, str] = field(default_factory=dict)  # judge and reward model, by MEASURED_BY's names


@dataclass
class Collection:
    observations: list[Observation] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    train_logs: dict[str, Path] = field(default_factory=dict)  # run label -> log_history.json
    candidates: dict[str, Path] = field(default_factory=dict)  # sampling setting -> training file


def _values(metrics: dict, samples: dict | None, ppl: str, sample_set: str = "all") -> dict[str, float]:
    values = {
        "PPL": metrics.get(f"ppl_{ppl}"),
        "Perplexity": metrics.get(f"ppl_{ppl}"),
        "Reward": metrics.get("reward"),
    }
    if "rm_accuracy_paper" in metrics:
        values["Accuracy"] = 100 * metrics["rm_accuracy_paper"]
    # Table 6: statistics of the setting's training candidates. The paper's are over all of them, the data
    # set's included (DP's mean is the weighted mean of D's and P's: docs/paper-notes.md section 6);
    # "sampled" keeps the generated ones only, and a setting that generates none (P) has no value then.
    stats = (samples or {}).get(sample_set)
    if stats:
        values |= {"Mean": stats["mean"], "Std.": stats["std"], "Max": stats["max"]}
    return {k: v for k, v in values.items() if v is not None}


def _reward_model(reward: DictConfig) -> str:
    """The reward a run used, by the model it loads where it loads one (else the scorer's name)."""
    return str(reward.get("checkpoint_repo") or reward.get("path") or reward.name)


def find_runs(results: Path, *, ppl: str = "paper", samples: str = "all") -> Collection:
    """Every observation the finished runs under `results` provide, and the runs that failed."""
    found = Collection()
    for config_file in sorted(Path(results).rglob(".hydra/config.yaml")):
        folder = config_file.parent.parent
        if (folder / "FAILED").exists():
            found.failed.append(f"{folder}: {_failure((folder / 'FAILED').read_text(errors='replace'))}")
            continue
        if not (folder / "metrics.json").exists():
            if (folder / "STARTED").exists():  # killed, or still running: never silently skipped
                found.failed.append(
                    f"{folder}: started {(folder / 'STARTED').read_text().strip()}, not finished "
                    "(killed, or still running)"
                )
            continue
        # One run's unreadable config or metrics is listed as failed; it never stops the others' collation.
        try:
            cfg = OmegaConf.load(config_file)
        except Exception as error:
            found.failed.append(f"{folder}: {config_file}: cannot be read: {type(error).__name__}: {error}")
            continue
        try:
            run = _observe(folder, cfg, _read_metrics(folder / "metrics.json"), ppl, samples)
        except Exception as error:
            reason = str(error) if isinstance(error, MetricsError) else f"{type(error).__name__}: {error}"
            found.failed.append(f"{folder}: {folder / 'metrics.json'}: {reason}")
            continue
        found.observations += run.observations
        found.train_logs |= run.train_logs
        found.candidates |= run.candidates
    return found


def _failure(traceback_text: str) -> str:
    """The error a FAILED marker records: the last exception's type and message, on one line.

    Not the traceback's last line alone, which for an exception with a multi-line message (a YAML parser's
    points at the column with a "^") says nothing.
    """
    lines = traceback_text.strip().splitlines()
    if not lines:
        return "failed (the FAILED marker is empty)"
    headers = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    start = headers[-1] + 1 if headers else len(lines) - 1
    # After the header: indented frame lines, then the exception's own lines.
    while start < len(lines) - 1 and lines[start].startswith(" "):
        start += 1
    message = " ".join(line.strip() for line in lines[start:] if not set(line.strip()) <= set("^~"))
    return message[:500] + (" ..." if len(message) > 500 else "")


class MetricsError(ValueError):
    """A metrics.json the tables cannot read: the message says which key and what is wrong."""


# The numbers of an evaluation the tables read; each, where present, a number.
EVALUATED = ("reward", "ppl_paper", "ppl_exact", "rm_accuracy_paper")


def _read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json with the parts the tables read checked (raises MetricsError naming the key)."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MetricsError(
            f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); a truncated file?"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise MetricsError(f"cannot be read: {error}") from None
    if not isinstance(metrics, dict):
        raise MetricsError(f"expected a JSON object, got {type(metrics).__name__} {json.dumps(metrics)[:40]}")
    for key in ("initial", "final"):
        if key not in metrics:
            raise MetricsError(f"no {key!r} evaluation (a finished run writes 'initial' and 'final')")
        _check_evaluated(metrics[key], key)
    dataset = metrics.get("dataset", {})
    if not isinstance(dataset, dict):
        raise MetricsError(f"'dataset': expected an object of evaluations, got {type(dataset).__name__}")
    for name, evaluated in dataset.items():
        _check_evaluated(evaluated, f"dataset.{name}")
    samples = metrics.get("samples") or {}
    if not isinstance(samples, dict):
        raise MetricsError(f"'samples': expected an object, got {type(samples).__name__}")
    # Besides the sets of Table 6's statistics: the LLM judge's counts ("judge") and, with sampling=sources, the
    # statistics of each source ("sources": name -> statistics).
    sets = {k: v for k, v in samples.items() if k not in ("judge", "sources")}
    sets |= {f"sources.{k}": v for k, v in (samples.get("sources") or {}).items()}
    for sample_set, stats in sets.items():
        if stats is not None and not (
            isinstance(stats, dict) and all(_is_number(stats.get(k)) for k in ("mean", "std", "max"))
        ):
            raise MetricsError(f"'samples.{sample_set}': expected an object with numbers 'mean', 'std' and 'max'")
    if "reward_model_accuracy" in metrics and not _is_number(metrics["reward_model_accuracy"]):
        raise MetricsError(f"'reward_model_accuracy': {metrics['reward_model_accuracy']!r} is not a number")
    return metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_evaluated(evaluated: Any, key: str) -> None:
    if not isinstance(evaluated, dict):
        raise MetricsError(f"{key!r}: expected an object, got {type(evaluated).__name__}")
    if not isinstance(evaluated.get("artifact"), str):
        raise MetricsError(f"'{key}.artifact': missing or not a string")
    for name in EVALUATED:
        if name in evaluated and evaluated[name] is not None and not _is_number(evaluated[name]):
            raise MetricsError(f"'{key}.{name}': {evaluated[name]!r} is not a number")


def _observe(folder: Path, cfg: DictConfig, metrics: dict[str, Any], ppl: str, samples: str) -> Collection:
    """What one finished run provides: its observations, training log and candidates."""
    run = Collection()
    family = cfg.task.get("family", "hh")
    stands_in = cfg.model.get("stands_in_for")  # a paper model has none
    stands_in = OmegaConf.to_container(stands_in) if stands_in is not None else {}
    model = {fam: stands_in.get(fam, cfg.model.name) for fam in ("hh", "imdb")}
    ours = f"{cfg.model.name} / {cfg.task.name}"
    measured = {"judge": str(cfg.eval.get("judge", "?")), "reward": _reward_model(cfg.reward)}

    def add(
        key: dict,
        values: dict,
        artifact: str,
        ours: str = ours,
        seed: int = cfg.seed,
        family: str = family,
        measured: dict = measured,
    ) -> None:
        run.observations.append(Observation(key, ours, seed, values, artifact, family, measured))

    add(
        {"model": model, "sampling": "none", "method": "none"},
        _values(metrics["initial"], None, ppl),
        metrics["initial"]["artifact"],
    )
    if cfg.method.name in ("best_of_n", "sft", "ppo"):  # no candidates of a sampling setting
        extra = {"n": cfg.method.n} if cfg.method.name == "best_of_n" else {}
        if cfg.method.name == "ppo":
            extra["kl_coef"] = float(cfg.method.ppo.init_kl_coef)
        add(
            {"model": model, "sampling": "none", "method": cfg.method.name, **extra},
            _values(metrics["final"], None, ppl),
            metrics["final"]["artifact"],
        )
    elif cfg.method.name != "none":
        train_args = cfg.method.get("train_args") or {}
        setting = {"hh": cfg.sampling.name, "imdb": cfg.sampling.get("table10_setting")}
        if cfg.sampling.get("table10_setting"):
            setting["hh"] = None  # an IMDB-appendix setting: not a row of the HH tables
        add(
            {
                "model": model,
                "sampling": setting,
                "method": cfg.method.name,
                "rank_weight": float(train_args.get("rank_weight", 1.0)),
                "kl_coef": float(cfg.sampling.get("kl_coef") or 0.0),
            },
            _values(metrics["final"], metrics.get("samples"), ppl, samples),
            metrics["final"]["artifact"],
        )
    if metrics.get("train_log") and Path(metrics["train_log"]).exists():
        run.train_logs[f"{ours} {cfg.sampling.name} seed {cfg.seed} ({folder.name})"] = Path(metrics["train_log"])
    if metrics.get("candidates") and Path(metrics["candidates"]).exists():
        run.candidates[f"{cfg.sampling.name} / {ours}"] = Path(metrics["candidates"])
    for name, evaluated in metrics.get("dataset", {}).items():
        add(
            {"model": None, "sampling": "none", "method": "none", "responses": f"dataset_{name}"},
            _values(evaluated, None, ppl),
            evaluated["artifact"],
            ours=f"data set / {cfg.task.name}",
        )
    if "reward_model_accuracy" in metrics:
        scorer = cfg.reward.get("stands_in_for", cfg.reward.name)
        add(
            {"model": None, "sampling": "none", "method": "none", "scorer": scorer},
            {"Accuracy": 100 * metrics["reward_model_accuracy"]},
            f"rm:{cfg.reward.name}:{ours}",
            ours=f"{cfg.reward.name} / {cfg.task.name}",
        )
    return run


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
    """One line per (paper row, our model/task, judge, reward): paper value, ours, spread, difference, per
    column; a paper row that no run fills has one line with ours empty."""
    family = "imdb" if number in IMDB_TABLES else "hh"
    used = {MEASURED_BY[c] for c in spec["columns"] if c in MEASURED_BY}
    records = []
    for row_id, row in spec["rows"].items():
        groups: dict[tuple[str, str, str], list[Observation]] = {}
        for obs in observations:
            if _matches(row["key"], obs, family):
                # Runs measured with another judge or reward model are never averaged together.
                measured = (obs.ours, *(obs.measured.get(m, "") if m in used else "" for m in ("judge", "reward")))
                groups.setdefault(measured, []).append(obs)
        for (ours, judge, reward), group in sorted(groups.items()) or [(("", "", ""), [])]:
            cells = _cells(group, spec["columns"])
            record = {
                "row": row_id,
                **dict(zip(spec["label_columns"], row["label"])),
                "ours": ours,
                "judge": judge,
                "reward": reward,
            }
            for column in spec["columns"]:
                paper = entries.get((number, row_id, column), math.nan)
                mean, spread, seeds = cells.get(column, (math.nan, math.nan, 0))
                record |= {
                    f"{column} paper": paper,
                    f"{column} ours": mean,
                    f"{column} spread": spread,
                    f"{column} diff": mean - paper,
                    f"{column} seeds": seeds,
                }
            records.append(record)
    frame = pd.DataFrame.from_records(records)
    # Kept with the frame, so that every file written from it (or from a selection of its columns) prints alike.
    frame.attrs["digits"] = precision(number, spec)
    return frame


def precision(number: int, spec: dict) -> dict[str, int]:
    """Decimals per column of reference table `number`, as the paper prints them (reference.yaml's `precision`)."""
    given = spec.get("precision") or {}
    lacking = [c for c in spec["columns"] if c not in given]
    if lacking:  # no guess from the float values: 0.990 is stored as 0.99
        raise ValueError(f"reference table {number} gives no precision for columns {lacking}")
    return {column: int(given[column]) for column in spec["columns"]}


def _latex_text(text: Any) -> str:
    text = str(text)
    text = text.replace("ρ", r"$\rho$").replace(r"\emptyset", r"$\emptyset$")
    text = re.sub(r"\s*_\{([^}]*)\}", lambda m: "$_{" + m.group(1).replace("_", r"\_") + "}$", text)
    text = re.sub(r"(?<![\\$])_", r"\_", text)
    return text.replace("%", r"\%").replace("&", r"\&").replace("#", r"\#")


def _sentence(text: str) -> str:
    return text if text.rstrip().endswith(".") else text + "."


def _number(value: float, digits: int, spread: float = 0.0, seeds: int = 1) -> str:
    if value is None or math.isnan(value):
        return "--"
    return f"{value:.{digits}f}" + (f" $\\pm$ {spread:.{digits}f}" if seeds > 1 else "")


def _printed(value: Any, digits: int) -> Any:
    """A number as the tables print it (the same rounding as `_number`, trailing zeros kept), for the CSV files."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return value


def _column_digits(name: str, digits: dict[str, int]) -> int | None:
    """The decimals of a frame column ("Reward ours", "PPL diff", ...); None for labels and seed counts."""
    column, _, part = name.rpartition(" ")
    return digits.get(column) if part in ("paper", "ours", "spread", "diff") else None


def _measured(spec: dict, frame: pd.DataFrame) -> dict[str, list[str]]:
    """Per measure the table's columns use (judge, reward): the names our rows were measured with."""
    ours = frame[frame["ours"] != ""]
    used = dict.fromkeys(MEASURED_BY[c] for c in spec["columns"] if c in MEASURED_BY)
    return {measure: sorted(set(ours[measure])) for measure in used}


def _measured_text(spec: dict, measured: dict[str, list[str]]) -> str:
    """The caption's sentence naming what measured our rows and the paper's."""
    ours, paper = [], []
    for measure, names in measured.items():
        what = MEASURE_NAMES[measure]
        if len(names) == 1:
            ours.append(f"{what} by {names[0]}")
        elif names:
            ours.append(f"{what} by the model named in each row")
        if (spec.get("measured_with") or {}).get(measure):
            paper.append(f"{what} by {spec['measured_with'][measure]}")
    text = f"Ours: {', '.join(ours)}. " if ours else ""
    return text + (f"The paper: {', '.join(paper)}. " if paper else "")


def _per_row(measured: dict[str, list[str]]) -> list[str]:
    """The measures whose model differs between our rows: each gets a column naming it per row."""
    return [measure for measure, names in measured.items() if len(names) > 1]


def _samples_text(spec: dict, samples: str) -> str:
    if "Mean" not in spec["columns"]:
        return ""
    return (
        "Mean / Std. / Max over all training candidates of a setting, the data set's included. "
        if samples == "all"
        else "Mean / Std. / Max over the generated training candidates only. "
    )


def _columns(tuples: list[tuple[str, ...]]) -> pd.Index:
    """Header rows: one, or two where a second level says something."""
    if all(not rest or not any(rest) for _, *rest in tuples):
        return pd.Index([first for first, *_ in tuples])
    return pd.MultiIndex.from_tuples(tuples)


def _styled_latex(
    cells: list[list[str]],
    columns: pd.Index,
    n_labels: int,
    caption: str,
    label: str,
    bold: set[tuple[int, int]] | frozenset = frozenset(),
) -> str:
    """A booktabs table through pandas' Styler: cells and headers are LaTeX already (no escaping), the
    cells in `bold` (row, column positions) set in bold."""
    frame = pd.DataFrame(cells, columns=columns) if cells else pd.DataFrame(columns=columns)
    styler = frame.style.hide(axis="index")
    if bold:
        props = [
            ["textbf:--rwrap;" if (i, j) in bold else "" for j in range(frame.shape[1])] for i in range(frame.shape[0])
        ]
        styler = styler.apply(lambda _: pd.DataFrame(props, index=frame.index, columns=frame.columns), axis=None)
    return styler.to_latex(
        column_format="l" * n_labels + "r" * (frame.shape[1] - n_labels),
        hrules=True,
        caption=_latex_text(caption),
        label=label,
        position="t",
        position_float="centering",
        multicol_align="c",
    )


def _label_cells(spec: dict, r: pd.Series, per_row: list[str]) -> list[str]:
    return (
        [_latex_text(r[c]) for c in spec["label_columns"]]
        + [_latex_text(r["ours"]) or "--"]
        + [_latex_text(r[m]) or "--" for m in per_row]
    )


def _label_headers(spec: dict, ours: str, per_row: list[str]) -> list[str]:
    return [_latex_text(c) or "Method" for c in spec["label_columns"]] + [ours] + [PER_ROW_HEADER[m] for m in per_row]


def ours_latex(number: int, spec: dict, frame: pd.DataFrame, ppl: str, samples: str = "all") -> str:
    """Our numbers in the paper's column order, every paper row (dashes where no run fills it), the best
    of each column in bold; the header names the judge and reward model under each column."""
    measured = _measured(spec, frame)
    per_row = _per_row(measured)
    has_run = frame["ours"] != ""
    best = {}
    for column in spec["columns"]:
        values = frame.loc[has_run, f"{column} ours"].dropna()
        # Values measured with different judges or reward models are not ranked against each other.
        if column not in NOT_RANKED and len(values) > 1 and MEASURED_BY.get(column) not in per_row:
            best[column] = values.min() if column in LOWER_IS_BETTER else values.max()
    lines, bold = [], set()
    digits = precision(number, spec)
    n_labels = len(spec["label_columns"]) + 1 + len(per_row)
    for i, (_, r) in enumerate(frame.iterrows()):
        cells = _label_cells(spec, r, per_row)
        for j, column in enumerate(spec["columns"]):
            cells.append(_number(r[f"{column} ours"], digits[column], r[f"{column} spread"], r[f"{column} seeds"]))
            if r["ours"] and best.get(column) == r[f"{column} ours"]:
                bold.add((i, n_labels + j))
        lines.append(cells)
    headers = [(h, "") for h in _label_headers(spec, "Model / task (ours)", per_row)]
    for column in spec["columns"]:
        names = measured.get(MEASURED_BY.get(column), [])
        headers.append(
            (_latex_text(column), _latex_text(names[0]) if len(names) == 1 else ("per row" if names else ""))
        )
    caption = (
        f"{_sentence(spec.get('caption') or spec['name'])} Our runs; rows name the model and task that made "
        f"them, dashes where no run fills a row. {_measured_text(spec, measured)}{_samples_text(spec, samples)}"
        f"PPL in {ppl} mode; mean $\\pm$ std over seeds where there are several."
    )
    return _styled_latex(lines, _columns(headers), n_labels, caption, f"tab:table{number}", bold)


def side_by_side_latex(number: int, spec: dict, frame: pd.DataFrame, ppl: str, samples: str = "all") -> str:
    """Every paper row with the paper's value, ours and the difference; a dash where either is missing."""
    measured = _measured(spec, frame)
    per_row = _per_row(measured)
    lines, digits = [], precision(number, spec)
    for _, r in frame.iterrows():
        cells = _label_cells(spec, r, per_row)
        for column in spec["columns"]:
            # The difference too, so that it reads against both numbers it is taken from.
            cells += [_number(r[f"{column} {part}"], digits[column]) for part in ("paper", "ours", "diff")]
        lines.append(cells)
    headers = [(h, "") for h in _label_headers(spec, "Ours from", per_row)]
    for column in spec["columns"]:
        headers += [(_latex_text(column), "paper"), (_latex_text(column), "ours"), (_latex_text(column), r"$\Delta$")]
    caption = (
        f"{_sentence(spec.get('caption') or spec['name'])} Paper and ours side by side (PPL in {ppl} mode); "
        f"ours come from the model and task named in each row. {_measured_text(spec, measured)}"
        f"{_samples_text(spec, samples)}"
    )
    return _styled_latex(
        lines,
        _columns(headers),
        len(spec["label_columns"]) + 1 + len(per_row),
        caption.strip(),
        f"tab:table{number}-vs-paper",
    )


def _csv(frame: pd.DataFrame) -> str:
    """The frame with its numbers as the tables print them: text, so 0.990 stays 0.990 (empty where missing)."""
    printed = frame.copy()
    for name in frame.columns:
        digits = _column_digits(name, frame.attrs["digits"])
        if digits is not None:
            printed[name] = [_printed(float(v), digits) for v in frame[name]]
    return printed.to_csv(index=False)


def collate(
    results: Path,
    out: Path,
    *,
    reference: Path = REFERENCE,
    ppl: str = "paper",
    samples: str = "all",
    strict: bool = False,
    force: bool = False,
) -> list[Path]:
    """Write every table of the paper that a run can fill (dashes where none does); return the files written.

    `samples` picks Table 6's Mean / Std. / Max: over "all" training candidates (the paper's) or the
    "sampled" ones. With `strict`, a missing cell of a table that some run fills, or a failed run, is an error.
    A table that would have fewer filled cells than the one in `out` is refused (CollateError, nothing written),
    as a mistyped or emptied results folder would otherwise wipe the tables; `force` replaces it anyway.
    """
    if samples not in SAMPLE_SETS:
        raise ValueError(f"samples={samples!r}: expected one of {SAMPLE_SETS}")
    results, out = Path(results), Path(out)
    if not results.is_dir():
        raise CollateError(
            f"{results}: {'not a folder' if results.exists() else 'no such folder'}; expected the "
            "folder holding the runs (paths.results, e.g. results/)"
        )
    if out.exists() and not out.is_dir():
        raise CollateError(f"{out}: not a folder; expected the folder the tables are written to (--out, paths.tables)")
    ref = yaml.safe_load(reference.read_text())
    entries = {(e["table"], e["row"], e["column"]): float(e["value"]) for e in ref["entries"]}
    found = find_runs(results, ppl=ppl, samples=samples)
    written, missing, blocking = [], [], []
    pending: dict[str, str] = {}
    shrunk: list[str] = []
    for number, spec in ref["tables"].items():
        if spec.get("reference_only"):
            continue
        frame = build_table(number, spec, entries, found.observations)
        has_run = frame["ours"] != ""
        lines = [
            f"Table {number}, row {r['row']} ({r['ours']}), column {c}: no value"
            for _, r in frame[has_run].iterrows()
            for c in spec["columns"]
            if math.isnan(r[f"{c} ours"])
        ]
        lines += [f"Table {number}, row {r['row']}: no run" for _, r in frame[~has_run].iterrows()]
        missing += lines
        if has_run.any():
            blocking += lines
        ours_columns = [c for c in frame.columns if not c.endswith((" paper", " diff"))]
        files = {
            f"table{number}.tex": ours_latex(number, spec, frame, ppl, samples),
            f"table{number}.csv": _csv(frame[ours_columns]),
            f"table{number}_vs_paper.tex": side_by_side_latex(number, spec, frame, ppl, samples),
            f"table{number}_vs_paper.csv": _csv(frame),
        }
        pending |= files
        had = _filled_in_file(out / f"table{number}.csv", spec["columns"])
        now = int(frame[[f"{c} ours" for c in spec["columns"]]].notna().to_numpy().sum())
        if now < had:
            shrunk.append(f"table{number} ({had} filled cells -> {now})")
    if shrunk and not force:
        raise CollateError(
            f"{out}: not replaced, as {', '.join(shrunk)} would lose cells: {results} holds fewer "
            "finished runs than the tables were collated from (a mistyped results folder?). Nothing "
            "was written; pass --force (python -m rrhf.tables ... --force) to replace them anyway"
        )
    wombat = wombat_table(results)
    if len(wombat):
        pending |= wombat_files(wombat)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in pending.items():
        (out / name).write_text(text)
        written.append(out / name)
    written += _plots(found, out / "plots")
    report = ["# Cells without a value in the tables written", *missing, "", "# Failed runs", *found.failed]
    (out / "missing.txt").write_text("\n".join(report) + "\n")
    log.info(
        "collate: %d observations, %d failed runs -> %d files in %s; %d missing cells (see %s)",
        len(found.observations),
        len(found.failed),
        len(written),
        out,
        len(missing),
        out / "missing.txt",
    )
    for line in found.failed:
        log.warning("failed run: %s", line)
    if strict and (blocking or found.failed):
        raise SystemExit(
            f"collate --strict: {len(blocking)} missing cells in tables that runs fill, "
            f"{len(found.failed)} failed runs (listed in {out / 'missing.txt'})"
        )
    return written


# The slides' Wombat rows (seed-rrhf-slides.txt, lines 432-434): summed GPT-4 scores over Vicuna's 80 questions,
# (the other system's, Wombat's), by the name experiment=wombat gives each system in eval.pairwise.versus.
WOMBAT_SLIDES = {
    "initial": ("Alpaca", 567, 616),
    "alpaca_chatgpt": ("Alpaca (ChatGPT)", 574, 612),
    "chatgpt": ("ChatGPT", 669, 548),
}


def _difference_interval(judgements: Path, draws: int = 10_000) -> tuple[float, float, float]:
    """The mean over questions of (trained - other) score and its 95% bootstrap interval, resampling questions
    (percentile method, a fixed seed so that a collation is reproducible)."""
    import numpy as np

    if not judgements.is_file():  # an artifact deleted since the run: the sums still stand
        return math.nan, math.nan, math.nan
    rows = [json.loads(line) for line in judgements.read_text().splitlines() if line.strip()]
    diffs = np.asarray([r["evaluated"] - r["versus"] for r in rows if r.get("outcome") is not None], dtype=float)
    if not len(diffs):
        return math.nan, math.nan, math.nan
    means = np.random.default_rng(0).choice(diffs, size=(draws, len(diffs))).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diffs.mean()), float(low), float(high)


def wombat_table(results: Path) -> pd.DataFrame:
    """One row per (run, other system) of every finished run with a pairwise judged evaluation (eval=pairwise_judge):
    summed scores, win / tie / lose, the judge, the mean score difference over questions with its interval, and the
    slides' sums where the system is one the slides report."""
    rows = []
    for metrics_file in sorted(Path(results).rglob("metrics.json")):
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError):
            continue  # listed as a failed run by find_runs
        pairwise = metrics.get("pairwise") if isinstance(metrics, dict) else None
        if not isinstance(pairwise, dict):
            continue
        for system, summary in pairwise.items():
            if not isinstance(summary, dict) or "evaluated_sum" not in summary:
                continue
            mean, low, high = _difference_interval(Path(summary["artifact"]) / "judgements.jsonl")
            paper = WOMBAT_SLIDES.get(system, ("", math.nan, math.nan))
            rows.append(
                {
                    "run": str(metrics_file.parent.relative_to(results)),
                    "versus": system,
                    "judge": summary.get("judge", ""),
                    "questions": summary["pairs"],
                    "scored": summary["scored"],
                    "trained sum": summary["evaluated_sum"],
                    "versus sum": summary["versus_sum"],
                    "win": summary["win"],
                    "tie": summary["tie"],
                    "lose": summary["lose"],
                    "mean diff": mean,
                    "95% low": low,
                    "95% high": high,
                    "slides row": paper[0],
                    "slides versus sum": paper[1],
                    "slides Wombat sum": paper[2],
                }
            )
    return pd.DataFrame(rows)


def wombat_files(frame: pd.DataFrame) -> dict[str, str]:
    """wombat.md / .tex / .csv from `wombat_table`'s frame."""
    shown = frame.copy()
    for column in ("trained sum", "versus sum"):
        shown[column] = shown[column].map(lambda v: f"{v:g}")
    for column in ("mean diff", "95% low", "95% high"):
        shown[column] = shown[column].map(lambda v: "" if math.isnan(v) else f"{v:+.2f}")
    for column in ("slides versus sum", "slides Wombat sum"):
        shown[column] = shown[column].map(lambda v: "" if math.isnan(v) else f"{v:g}")
    caption = (
        "Vicuna-style pairwise evaluation (eval=pairwise_judge): the trained policy against each other system, the "
        "judge scoring both answers to each question from 1 to 10; sums over the scored questions, win / tie / lose "
        "of the trained policy, and the mean per-question difference (trained - other) with a 95% bootstrap "
        "interval over questions. Slides: Alpaca 567 vs Wombat 616, Alpaca (ChatGPT) 574 vs 612, ChatGPT 669 vs "
        "548 (GPT-4 as the judge, Vicuna's 80 questions)."
    )
    lines = ["| " + " | ".join(shown.columns) + " |", "|---" * len(shown.columns) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    markdown = "# Wombat: pairwise judged evaluation\n\n" + caption + "\n\n" + "\n".join(lines) + "\n"
    latex = shown.map(_latex_text).to_latex(index=False, caption=caption, label="tab:wombat")
    return {"wombat.md": markdown, "wombat.tex": latex, "wombat.csv": shown.to_csv(index=False)}


class CollateError(ValueError):
    """The tables cannot be collated as asked: the message names the folder or table and how to proceed."""


def _filled_in_file(path: Path, columns: list[str]) -> int:
    """The filled cells of our columns in a table's CSV written before (0 where there is none to read)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return 0
    ours = [f"{c} ours" for c in columns if f"{c} ours" in frame.columns]
    return int(sum(value.strip() not in ("", "--", "nan", "NaN") for c in ours for value in frame[c]))


def collate_after_runs(results: Path, tables: Path) -> None:
    """Collate after a run or a sweep: the runs are finished and their metrics.json written, so a problem with
    the tables (a refusal, a `paths.tables` that cannot be written) is a warning, never the runs' failure."""
    try:
        collate(Path(results), Path(tables))
    except Exception as error:
        log.warning(
            "the tables in %s were not collated: %s. The runs' metrics.json are written; collate them with "
            "`python -m rrhf.tables %s --out %s` once that is fixed",
            tables,
            error,
            results,
            tables,
        )


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
        from rrhf.launch import rank

        # A sweep under torchrun runs on every rank; rank 0 writes the metrics, so it alone collates them.
        if config.get("collate", True) and rank() == 0:
            collate_after_runs(Path(config.paths.results), Path(config.paths.tables))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="folder holding the runs (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("paper_tables"))
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--ppl", choices=("paper", "exact"), default="paper", help="which perplexity to show")
    parser.add_argument(
        "--samples",
        choices=SAMPLE_SETS,
        default="all",
        help="Table 6's Mean / Std. / Max: over all training candidates (the paper's) or the sampled",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail when a table that runs fill misses a cell, or a run failed"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace tables even where they would have fewer filled cells than before"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        written = collate(
            args.results,
            args.out,
            reference=args.reference,
            ppl=args.ppl,
            samples=args.samples,
            strict=args.strict,
            force=args.force,
        )
    except CollateError as error:
        sys.exit(f"python -m rrhf.tables: {error}")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
