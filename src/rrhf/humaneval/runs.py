"""Table 3's sheets from a sweep's finished runs, and the run's reward model as an automatic judge of them.

The paper's Table 3 is a human evaluation on HH with Alpaca as the initial policy: RRHF_DP against the data set's
good responses, against PPO and against RRHF-IP-2 (win / tie / lose, slides lines 294-312).

experiment=offline/table3 (the embedded default) and experiment=table3 (Alpaca on HH, the paper's setting) run
Table 3's arms: RRHF_DP, PPO and RRHF-IP-2. When the sweep ends, `Table3Callback`

1. reads each arm's final evaluation (`final.artifact` of its metrics.json: responses.jsonl, one response per
   test prompt) and the data set's chosen responses (`dataset.chosen.artifact` of the evaluated arm's run),
   pairs them by test prompt and lays out the blind sheets and the annotation pages (`rrhf.humaneval`), as the
   cached stage `sheets` keyed by those artifacts and the `table3` settings: a rerun of a finished sweep
   draws nothing anew and hands out the same sheet;
2. copies them to `<sweep folder>/table3/<sheet id>/` (key.json, annotators/<name>.json and .html);
3. with `judge=reward_model`, labels every pair with the runs' reward (`judge_with_reward`) and collects
   the labels as `table3_reward_model.*` in paths.tables, with the reward's own accuracy on the test pairs;
   with `judge=llm`, asks an LLM judge instead (`judge_with_llm`: conf/judge/llm.yaml, both orders, through
   the judge cache) and collects `table3_llm.*`, with the judge's accuracy on the task's test pairs.

A source in the key is the run (`<sweep>/<run folder>`) and the artifact file (`evaluate/<key>/responses.jsonl`,
relative to the artifact store), so an un-blinded pair can be traced to the run that wrote it.

    python -m rrhf.humaneval sheets-from-runs results/offline_table3 --out DIR
    python -m rrhf.humaneval judge-reward-model results/offline_table3 --sheets DIR --out paper_tables
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rrhf.arms import Run, load_arms
from rrhf.artifacts import run_stage
from rrhf.data import read_jsonl
from rrhf.humaneval.page import write_pages
from rrhf.humaneval.sheets import (
    PAPER_ANNOTATORS,
    PAPER_COMPARISONS,
    PAPER_PAIRS_PER_COMPARISON,
    PAPER_SHARED,
    Comparison,
    Pair,
    build_sheets,
    write_json_atomic,
    write_sheets,
)
from rrhf.humaneval.table3 import UNPARSED, Table3, collect

log = logging.getLogger(__name__)

DATASET_CHOSEN = "dataset_chosen"  # Table 3's "good responses": the data set's chosen response
REWARD_JUDGE = "reward_model"
LLM_JUDGE = "llm"
# The reward model's accuracy on HH's test pairs that the paper reports (Table 5, first row), for the
# accuracy file of a judge that is that reward model.
PAPER_RM_ACCURACY = {
    "reward": "gptj_rm_static",
    "accuracy": 68.49,
    "source": "Table 5 (seed-rrhf-slides.txt, line 332)",
}

# The `table3` settings when a sweep folder does not record them (multirun.yaml): experiment=offline/table3's.
DEFAULT_SETTINGS: dict[str, Any] = {
    "arm_group": "findings",
    "run_seed": None,
    "systems": {"rrhf_dp": "rrhf_dp", "ppo": "ppo", "rrhf_ip2": "ip2"},
    "comparisons": [{"name": n, "evaluated": e, "versus": v} for n, e, v in PAPER_COMPARISONS],
    "pairs_per_comparison": PAPER_PAIRS_PER_COMPARISON,
    "shared": PAPER_SHARED,
    "annotators": PAPER_ANNOTATORS,
    "seed": 0,
    "reward_margin": 0.0,
}


@dataclass(frozen=True)
class Responses:
    """One system's responses to the test prompts, in the order of its responses.jsonl, and where they came from."""

    system: str
    run_key: str
    artifact: Path  # the evaluation artifact folder
    rows: list[dict[str, Any]]

    def source(self, line: int) -> dict[str, Any]:
        return {
            "system": self.system,
            "run_key": self.run_key,
            "artifact": f"{self.artifact.parent.name}/{self.artifact.name}/responses.jsonl",
            "line": line,
        }


def settings_of(node: Any) -> dict[str, Any]:
    """The `table3` settings as plain values, the defaults filling what the node leaves out."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    out = {**DEFAULT_SETTINGS, **plain}
    evaluated = {c["evaluated"] for c in out["comparisons"]}
    needed = evaluated | {c["versus"] for c in out["comparisons"]}
    unknown = sorted(s for s in needed - {DATASET_CHOSEN} if s not in out["systems"])
    if unknown:
        raise ValueError(
            f"table3.comparisons name systems {unknown} that table3.systems does not map to an arm "
            f"(table3.systems: {out['systems']})"
        )
    return out


def sweep_settings(results: Path) -> dict[str, Any]:
    """The `table3` settings the sweep in `results` ran with (Hydra's multirun.yaml), else the defaults."""
    saved = Path(results) / "multirun.yaml"
    if saved.exists():
        node = OmegaConf.load(saved).get("table3")
        if node is not None:
            return settings_of(node)
    return settings_of({})


def _run_key(run: Run) -> str:
    return f"{run.folder.parent.name}/{run.folder.name}"


def table3_runs(results: Path, settings: Mapping[str, Any]) -> dict[str, Run]:
    """The finished run of each of Table 3's systems under `results` (by system name), all at one training seed:
    `run_seed`, or the lowest seed every arm ran."""
    group, systems = settings["arm_group"], settings["systems"]
    arms = load_arms(results, group)
    missing = sorted({arm for arm in systems.values() if arm not in arms})
    if missing:
        raise FileNotFoundError(
            f"{results}: no finished run of {group}={','.join(missing)} (Table 3 needs "
            f"{group}={','.join(sorted(set(systems.values())))})"
        )
    seeds = set.intersection(*(set(arms[arm].seeds) for arm in systems.values()))
    seed = settings.get("run_seed")
    if seed is None:
        if not seeds:
            raise ValueError(f"{results}: the arms {sorted(set(systems.values()))} share no training seed")
        seed = min(seeds)
    elif seed not in seeds:
        raise ValueError(f"{results}: table3.run_seed={seed}, but not every arm ran it (common seeds: {sorted(seeds)})")
    return {system: next(r for r in arms[arm].runs if r.seed == seed) for system, arm in systems.items()}


def _responses(runs: Mapping[str, Run], settings: Mapping[str, Any]) -> dict[str, Responses]:
    out = {
        system: Responses(system, _run_key(run), Path(run.metrics["final"]["artifact"]), [])
        for system, run in runs.items()
    }
    if any(c["versus"] == DATASET_CHOSEN or c["evaluated"] == DATASET_CHOSEN for c in settings["comparisons"]):
        evaluated = runs[settings["comparisons"][0]["evaluated"]]
        chosen = (evaluated.metrics.get("dataset") or {}).get("chosen")
        if not chosen:
            raise ValueError(
                f"{evaluated.folder}: its metrics.json has no evaluation of the data set's chosen "
                "responses (dataset.chosen), which Table 3's good-response row needs "
                "(eval.dataset_responses=true)"
            )
        out[DATASET_CHOSEN] = Responses(DATASET_CHOSEN, _run_key(evaluated), Path(chosen["artifact"]), [])
    return out


def sheet_inputs(runs: Mapping[str, Run], settings: Mapping[str, Any]) -> dict[str, Any]:
    """What the `sheets` stage is keyed by: each system's run and evaluation artifact (by its content key, the
    folder's name) and the settings that shape the sheets (the judge's margin does not)."""
    shaping = {k: v for k, v in settings.items() if k != "reward_margin"}
    return {
        "stage": "sheets",
        "settings": shaping,
        "sources": {
            s: {"run_key": r.run_key, "artifact": f"{r.artifact.parent.name}/{r.artifact.name}"}
            for s, r in sorted(_responses(runs, settings).items())
        },
    }


def _by_prompt(responses: Responses) -> dict[tuple[str, int], tuple[str, int]]:
    # Keyed by the prompt and its occurrence: a test set may hold one prompt twice, with two responses.
    seen: Counter[str] = Counter()
    out = {}
    for line, row in enumerate(responses.rows):
        out[row["prompt"], seen[row["prompt"]]] = (row["response"], line)
        seen[row["prompt"]] += 1
    return out


def paired_comparisons(responses: Mapping[str, Responses], settings: Mapping[str, Any]) -> list[Comparison]:
    """Each comparison's pairs, one per test prompt (in the evaluated system's order), with their sources."""
    comparisons = []
    for comp in settings["comparisons"]:
        a, b = responses[comp["evaluated"]], responses[comp["versus"]]
        theirs = _by_prompt(b)
        pairs = []
        for (prompt, n), (text, line) in _by_prompt(a).items():
            if (prompt, n) not in theirs:
                raise ValueError(
                    f"comparison {comp['name']}: {b.system} ({b.run_key}, {b.artifact}) has no response "
                    f"to a test prompt {a.system} answered: {prompt[:80]!r}"
                )
            other, other_line = theirs[prompt, n]
            pairs.append(Pair(prompt, text, other, a.source(line), b.source(other_line)))
        if len(theirs) != len(pairs):
            raise ValueError(
                f"comparison {comp['name']}: {b.system} answered {len(theirs)} test prompts, "
                f"{a.system} {len(pairs)}: not the same test set"
            )
        comparisons.append(Comparison(comp["name"], comp["evaluated"], comp["versus"], pairs))
    return comparisons


def sheets_stage(
    runs: Mapping[str, Run], settings: Mapping[str, Any], artifacts: Path | None = None
) -> tuple[Path, bool]:
    """The `sheets` artifact (key.json, annotators/<name>.json and .html, design.json) for these runs and
    settings, built if it is not in the store; the second value says whether it was built. `artifacts`: the
    artifact store, by default the one holding the runs' evaluations."""
    responses = _responses(runs, settings)
    root = Path(artifacts) if artifacts is not None else next(iter(responses.values())).artifact.parent.parent

    def build(work: Path) -> None:
        loaded = {
            s: Responses(r.system, r.run_key, r.artifact, read_jsonl(r.artifact / "responses.jsonl"))
            for s, r in responses.items()
        }
        comparisons = paired_comparisons(loaded, settings)
        prompts = min(len(c.pairs) for c in comparisons)
        asked = settings["pairs_per_comparison"]
        # The paper's 110 pairs per comparison are more than a small test set has: every prompt then.
        per_comparison = None if asked is None else min(int(asked), prompts)
        if asked is not None and per_comparison < asked:
            log.warning(
                "table3: %d pairs per comparison asked, the runs answered %d test prompts: drawing all %d",
                asked,
                prompts,
                per_comparison,
            )
        drawn = (prompts if per_comparison is None else per_comparison) * len(comparisons)
        # Likewise the 30 shared pairs: at most half of what is drawn, so that scored pairs remain.
        shared = min(int(settings["shared"]), drawn // 2)
        if shared < int(settings["shared"]):
            log.warning("table3: %d shared pairs asked of %d drawn: sharing %d", settings["shared"], drawn, shared)
        sheets = build_sheets(
            comparisons,
            seed=int(settings["seed"]),
            pairs_per_comparison=per_comparison,
            shared=shared,
            annotators=settings["annotators"],
        )
        write_sheets(sheets, work)
        write_pages(sheets, work)
        write_json_atomic(
            work / "design.json",
            {
                "sheet_id": sheets.sheet_id,
                "pairs_per_comparison_asked": asked,
                "pairs_per_comparison": per_comparison,
                "test_prompts": prompts,
                "shared": shared,
                "settings": dict(settings),
                "sources": {s: {"run_key": r.run_key, "artifact": str(r.artifact)} for s, r in loaded.items()},
            },
        )

    return run_stage(root, "sheets", sheet_inputs(runs, settings), build)


def publish(folder: Path, dest: Path) -> Path:
    """Copy a sheets artifact to `dest/<sheet id>/` (whole or not at all); return that folder."""
    sheet_id = json.loads((Path(folder) / "key.json").read_text(encoding="utf-8"))["sheet_id"]
    target = Path(dest) / sheet_id
    if (target / "key.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{sheet_id}."))
    try:
        shutil.copytree(folder, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns("DONE"))
        work.replace(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def sheets_from_runs(
    results: Path, out: Path | None = None, settings: Mapping[str, Any] | None = None, artifacts: Path | None = None
) -> Path:
    """Build (or find) the sheets of the sweep in `results` and copy them to `out/<sheet id>/` (default
    `results/table3/`); print where the key and the pages are. Returns the copy's folder."""
    settings = dict(settings) if settings is not None else sweep_settings(results)
    runs = table3_runs(results, settings)
    folder, built = sheets_stage(runs, settings, artifacts)
    copy = publish(folder, Path(out) if out is not None else Path(results) / "table3")
    key = json.loads((copy / "key.json").read_text(encoding="utf-8"))
    print(f"table3: sheet {key['sheet_id']} ({'built' if built else 'cached'} at {folder})")
    print(f"  key (keep it from the annotators): {copy / 'key.json'}")
    for name in key["annotators"]:
        print(f"  {name}: {copy / 'annotators' / f'{name}.html'} ({len(key['assignments'][name])} pairs)")
    return copy


# --- the reward model as a judge -----------------------------------------------------------------------------


def label(score_a: float, score_b: float, margin: float) -> str:
    """The label of a pair from the two responses' scores: the higher wins; within `margin` a tie."""
    if abs(score_a - score_b) <= margin:
        return "tie"
    return "A" if score_a > score_b else "B"


def _shown_items(sheets: Path) -> dict[str, dict[str, Any]]:
    items = {}
    for path in sorted((Path(sheets) / "annotators").glob("*.json")):
        for item in json.loads(path.read_text(encoding="utf-8"))["items"]:
            items[item["id"]] = item
    return items


def reward_scores_stage(sheets: Path, run: Run, artifacts: Path | None = None) -> tuple[Path, bool]:
    """Scores of both responses of every shown pair by the run's reward: cached stage `reward_judge`."""
    from rrhf import placement
    from rrhf.reward import build_scorer

    reward = run.config.reward
    where = placement.from_config(run.config, dtype=reward.get("dtype"))
    sheet_id = json.loads((Path(sheets) / "key.json").read_text(encoding="utf-8"))["sheet_id"]
    inputs = {
        "stage": "reward_judge",
        "sheet_id": sheet_id,
        "reward": OmegaConf.to_container(reward, resolve=True),
        "placement": where.key(),
    }

    def build(work: Path) -> None:
        scorer = build_scorer(reward, where)
        items = _shown_items(sheets)
        ids = sorted(items)
        prompts = [items[i]["prompt"] for i in ids]
        flat = scorer.score(
            prompts + prompts, [items[i]["response_a"] for i in ids] + [items[i]["response_b"] for i in ids]
        )
        write_json_atomic(work / "scores.json", {i: [flat[k], flat[len(ids) + k]] for k, i in enumerate(ids)})

    root = Path(artifacts) if artifacts is not None else Path(run.metrics["final"]["artifact"]).parent.parent
    return run_stage(root, "reward_judge", inputs, build)


def _dataset_pairs(run: Run) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    # The evaluation stage's rows of the data set's chosen and rejected responses, prompt by prompt.
    dataset = run.metrics.get("dataset") or {}
    if not {"chosen", "rejected"} <= set(dataset):
        return None
    chosen, rejected = (read_jsonl(Path(dataset[f]["artifact"]) / "responses.jsonl") for f in ("chosen", "rejected"))
    if [r["prompt"] for r in chosen] != [r["prompt"] for r in rejected]:
        raise ValueError(f"{run.folder}: the chosen and rejected evaluations answered different test prompts")
    return chosen, rejected


def dataset_pair_rewards(run: Run) -> dict[str, list[float]] | None:
    """The run's reward of the data set's chosen and rejected responses to the test prompts, as its evaluation
    stage scored them (the same reward, the same texts: no second pass over thousands of HH pairs); None where
    the task has no rejected responses."""
    pairs = _dataset_pairs(run)
    if pairs is None:
        return None
    chosen, rejected = pairs
    return {"chosen": [float(r["reward"]) for r in chosen], "rejected": [float(r["reward"]) for r in rejected]}


def dataset_test_pairs(run: Run) -> list[tuple[str, str, str]] | None:
    """The task's (prompt, chosen, rejected) test pairs, as the run's evaluation read them; None where the task
    has no rejected responses."""
    pairs = _dataset_pairs(run)
    if pairs is None:
        return None
    return [(c["prompt"], c["response"], r["response"]) for c, r in zip(*pairs)]


def reward_accuracy(test_pairs: Mapping[str, Sequence[float]] | None, margin: float) -> dict[str, Any]:
    """How the judge orders the task's chosen / rejected test pairs: the fractions where chosen scores higher,
    where the two tie (within `margin`) and where rejected scores higher. A reward scores each response on its
    own, so the order the two are shown in cannot change its verdict: one order is all there is to measure."""
    if not test_pairs:
        return {"pairs": 0, "chosen_higher": None, "tie": None, "rejected_higher": None}
    counts = Counter(label(c, r, margin) for c, r in zip(test_pairs["chosen"], test_pairs["rejected"]))
    n = sum(counts.values())
    return {"pairs": n, "chosen_higher": counts["A"] / n, "tie": counts["tie"] / n, "rejected_higher": counts["B"] / n}


def judge_with_reward(
    results: Path,
    sheets: Path,
    out: Path,
    settings: Mapping[str, Any] | None = None,
    margin: float | None = None,
    artifacts: Path | None = None,
) -> Table3:
    """Label the sheets in `sheets` with the reward of the evaluated arm's run, write the labels files beside
    them (`labels/reward_model/<annotator>.json`, the page's format with a "judge" field) and collect Table 3
    into `out` as table3_reward_model.{tex,csv,md,json} and table3_reward_model_vs_paper.tex, with the reward's
    accuracy on the test pairs in table3_reward_model_accuracy.json."""
    settings = dict(settings) if settings is not None else sweep_settings(results)
    margin = float(settings["reward_margin"] if margin is None else margin)
    run = table3_runs(results, settings)[settings["comparisons"][0]["evaluated"]]
    scored, _ = reward_scores_stage(sheets, run, artifacts)
    scores = json.loads((scored / "scores.json").read_text())
    judge = f"reward model {run.config.reward.name}"
    accuracy = {
        "judge": judge,
        "reward": OmegaConf.to_container(run.config.reward, resolve=True),
        "margin": margin,
        "run": _run_key(run),
        **reward_accuracy(dataset_pair_rewards(run), margin),
        "note": "the reward the RRHF and PPO arms were trained on: it favours them, and is no human judge",
    }
    if run.config.reward.name == PAPER_RM_ACCURACY["reward"]:
        accuracy["paper"] = PAPER_RM_ACCURACY
    table = write_judged_table(sheets, out, REWARD_JUDGE, judge, {i: label(*s, margin) for i, s in scores.items()})
    table.files.append(_write_accuracy(out, REWARD_JUDGE, table, accuracy))
    shown = (
        "n/a (no rejected responses)"
        if accuracy["pairs"] == 0
        else (
            f"chosen higher {100 * accuracy['chosen_higher']:.1f}%, tie {100 * accuracy['tie']:.1f}%, "
            f"rejected higher {100 * accuracy['rejected_higher']:.1f}% of {accuracy['pairs']} test pairs"
        )
    )
    _report(f"table3: {judge} (margin {margin}): {shown}", table)
    return table


def write_judged_table(sheets: Path, out: Path, slug: str, judge: str, labels: Mapping[str, str]) -> Table3:
    """An automatic judge's labels (item id: "A" | "tie" | "B" | "unparsed") written as one labels file per
    annotator in `sheets/labels/<slug>/` (the page's format with a "judge" field) and collected into `out` as
    table3_<slug>.{tex,csv,md,json} and table3_<slug>_vs_paper.tex."""
    key = json.loads((Path(sheets) / "key.json").read_text(encoding="utf-8"))
    labels_dir = Path(sheets) / "labels" / slug
    files = [
        write_json_atomic(
            labels_dir / f"{name}.json",
            {
                "sheet_id": key["sheet_id"],
                "annotator": name,
                "judge": judge,
                "labels": {i: labels[i] for i in key["assignments"][name]},
            },
        )
        for name in key["annotators"]
    ]
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        table = collect(Path(sheets) / "key.json", files, Path(tmp))
        written = []
        for path in table.files:
            # Beside the human table3.*, never in its place; a LaTeX label of its own, so both can be included.
            name = path.name.replace("table3", f"table3_{slug}", 1)
            text = path.read_text(encoding="utf-8").replace("{tab:table3", "{tab:table3-" + slug.replace("_", "-"))
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            written.append(target)
    table.files = written
    return table


def _write_accuracy(out: Path, slug: str, table: Table3, accuracy: Mapping[str, Any]) -> Path:
    return write_json_atomic(Path(out) / f"table3_{slug}_accuracy.json", {"sheet_id": table.sheet_id, **accuracy})


def _report(headline: str, table: Table3) -> None:
    print(headline)
    for row in table.rows:
        print(f"  {row.comparison}: win {row.counts['win']} / tie {row.counts['tie']} / lose {row.counts['lose']}")
    if table.unparsed:
        print(f"  unparsed (left out): {table.unparsed}")
    for path in table.files:
        print(f"  {path}")


# --- an LLM as a judge -----------------------------------------------------------------------------------------


def _llm_settings(judge: Mapping[str, Any] | None) -> dict[str, Any]:
    # conf/judge/llm.yaml's defaults, for a caller (a test, the command line) that passes some or none.
    from rrhf.judging.server import JUDGE_DEFAULTS

    defaults = {**JUDGE_DEFAULTS, "template": "single_letter"}
    plain = OmegaConf.to_container(judge, resolve=True) if isinstance(judge, DictConfig) else dict(judge or {})
    return {**defaults, **{k: v for k, v in plain.items() if k != "name"}}


def _fractions(judgements: Sequence[Any]) -> dict[str, Any]:
    from rrhf.judging import summarise

    summary = summarise(judgements)
    return {
        "pairs": summary["pairs"],
        "chosen_preferred": summary["A"],
        "tie": summary["tie"],
        "rejected_preferred": summary["B"],
        "unparsed": summary["unparsed"],
        "consistent": summary["consistent"],
    }


def judge_with_llm(
    results: Path,
    sheets: Path,
    out: Path,
    settings: Mapping[str, Any] | None = None,
    judge: Mapping[str, Any] | None = None,
) -> Table3:
    """Label the sheets in `sheets` with an LLM judge (`judge`: conf/judge/llm.yaml's fields) and collect Table 3
    into `out` as table3_llm.{tex,csv,md,json} and table3_llm_vs_paper.tex, with the judge's accuracy on the
    task's chosen / rejected test pairs in table3_llm_accuracy.json.

    Every shown pair is asked in both orders (an order flip is a tie); a pair without a readable verdict in either
    order is "unparsed": kept out of the labels' counts and listed, with the raw answers, in
    `sheets/labels/llm/unparsed.json`. Answers go through the judge cache: a rerun asks nothing again, and starts
    no local server when every answer is cached. A request that failed for good stops here before any table is
    written (a rerun asks only the failed ones)."""
    from rrhf.assets import cache_root
    from rrhf.judging import JudgeCache, pair_requests, pairwise_judgements, template_by_id
    from rrhf.judging.server import judge_client

    settings = dict(settings) if settings is not None else sweep_settings(results)
    conf = _llm_settings(judge)
    template = template_by_id(conf["template"])
    max_tokens = conf["max_tokens"] or template.max_tokens
    run = table3_runs(results, settings)[settings["comparisons"][0]["evaluated"]]
    items = _shown_items(sheets)
    ids = sorted(items)
    shown = [(items[i]["prompt"], items[i]["response_a"], items[i]["response_b"]) for i in ids]
    test_pairs = dataset_test_pairs(run) or []
    cache = JudgeCache(conf["cache"] or cache_root() / "judge_cache")
    client_settings = {"cache": cache, "max_tokens": max_tokens}

    asked = [r for pair in shown + test_pairs for r in pair_requests(*pair, template)]
    with judge_client(conf, asked, **client_settings) as client:
        # One call for the sheets and the test pairs: one server, one progress bar, identical requests sent once.
        judged = pairwise_judgements(
            client, shown + test_pairs, template=template, concurrency=int(conf["concurrency"])
        )
    failed = [j for j in judged if j.status == "error"]
    if failed:
        raise RuntimeError(
            f"table3: {len(failed)} of {len(judged)} pairs got no answer from the LLM judge "
            f"({client.url}); first: {failed[0].error}. The answers received are cached: rerun to ask the rest."
        )
    on_sheets, on_tests = judged[: len(shown)], judged[len(shown) :]
    name = f"LLM judge {client.model_id} ({template.name})"
    labels = {i: j.label or UNPARSED for i, j in zip(ids, on_sheets)}
    unparsed = {i: j.to_dict() for i, j in zip(ids, on_sheets) if j.label is None}
    write_json_atomic(Path(sheets) / "labels" / LLM_JUDGE / "unparsed.json", {"judge": name, "items": unparsed})
    table = write_judged_table(sheets, out, LLM_JUDGE, name, labels)
    accuracy = {
        "judge": name,
        "model": client.model_id,
        "endpoint": conf["base_url"] or "local server (rrhf.judging.local_server)",
        "template": template.name,
        "max_tokens": max_tokens,
        "run": _run_key(run),
        **_fractions(on_tests),
        "note": (
            "fractions of the task's chosen / rejected test pairs, each asked in both orders (an order flip is a "
            "tie); unparsed pairs have no verdict. A small local model is a weak judge: read its table with this."
        ),
    }
    table.files.append(_write_accuracy(out, LLM_JUDGE, table, accuracy))
    shown_acc = (
        "n/a (no rejected responses)"
        if not on_tests
        else (
            f"chosen preferred {100 * accuracy['chosen_preferred']:.1f}%, tie {100 * accuracy['tie']:.1f}%, "
            f"rejected preferred {100 * accuracy['rejected_preferred']:.1f}%, unparsed "
            f"{100 * accuracy['unparsed']:.1f}% of {accuracy['pairs']} test pairs"
        )
    )
    _report(f"table3: {name}: {shown_acc}", table)
    return table


class Table3Callback(Callback):
    """Build Table 3's sheets when experiment=table3 / offline/table3's sweep ends; with judge=reward_model, judge
    them with the reward as well, with judge=llm with an LLM judge."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from rrhf.launch import rank

        if rank() != 0:  # under torchrun every rank ends the sweep; one writes
            return
        results = Path(config.hydra.sweep.dir)
        settings = settings_of(config.get("table3"))
        # The stages go to the store that holds the runs' evaluations (paths.artifacts, read from the runs).
        copy = sheets_from_runs(results, results / "table3", settings)
        judge = config.get("judge")
        name = judge.get("name") if judge is not None else None
        if name == REWARD_JUDGE:
            judge_with_reward(results, copy, Path(config.paths.tables), settings)
        elif name == LLM_JUDGE:
            judge_with_llm(results, copy, Path(config.paths.tables), settings, judge)
        elif name is not None:
            raise ValueError(f"judge={name}: Table 3 knows judge={REWARD_JUDGE} and judge={LLM_JUDGE}")
