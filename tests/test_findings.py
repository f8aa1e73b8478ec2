"""experiment=findings: paired intervals over seeds and prompts, verdict rules, and the table from a sweep's folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.latex import compile_table
from fixtures.runs import TINY_SWEEP
from omegaconf import OmegaConf

from rrhf.findings import CLAIMS, claim_verdict, comparison_verdict, load_arms, write_findings
from rrhf.stats import paired_interval


def test_paired_interval_brackets_the_mean_difference_and_is_paired() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=200) * 5  # large prompt-to-prompt spread, shared by both arms
    a, b = base + 0.3, base.copy()
    diff, lo, hi = paired_interval(a, b)
    assert diff == pytest.approx(0.3)
    assert lo == pytest.approx(0.3) and hi == pytest.approx(0.3)  # a constant paired difference: no spread
    noisy = b + rng.normal(size=200)
    diff, lo, hi = paired_interval(noisy, b)
    assert lo < diff < hi and lo < 0 < hi  # pure noise: 0 inside


@pytest.mark.parametrize(
    ("direction", "lo", "hi", "expected"),
    [
        ("higher", 0.1, 0.5, "holds"),
        ("higher", -0.1, 0.5, "inconclusive"),
        ("higher", -0.5, -0.1, "does not hold"),
        ("lower", -0.5, -0.1, "holds"),
        ("lower", 0.1, 0.5, "does not hold"),
        ("lower", -0.1, 0.1, "inconclusive"),
        ("not_lower", -0.2, 0.1, "holds"),
        ("not_lower", -0.5, -0.1, "does not hold"),
    ],
)
def test_comparison_verdicts(direction: str, lo: float, hi: float, expected: str) -> None:
    assert comparison_verdict(direction, lo, hi) == expected


def test_claim_verdict_needs_every_comparison() -> None:
    assert claim_verdict(["holds", "holds"]) == "holds"
    assert claim_verdict(["holds", "inconclusive"]) == "inconclusive"
    assert claim_verdict(["holds", "does not hold", "inconclusive"]) == "does not hold"
    assert claim_verdict(["no run"]) == "inconclusive"


def test_paired_interval_over_seeds_and_prompts() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(size=(3, 60)) * 3  # per seed and prompt, shared by both arms
    consistent = base + 0.2 + rng.normal(size=(3, 60)) * 0.1  # +0.2 at every seed
    diff, lo, hi = paired_interval(consistent, base)
    assert diff == pytest.approx(0.2, abs=0.05) and lo > 0.1 and hi < 0.3
    shifts = np.array([[1.0], [-0.8], [0.1]])  # the seeds disagree: the effect is seed noise
    diff, lo, hi = paired_interval(base + shifts, base)
    assert lo < 0 < hi
    one = paired_interval(consistent[:1], base[:1])  # one seed: the prompt bootstrap of that seed
    assert one[0] == pytest.approx(float((consistent[0] - base[0]).mean()))


def _fake_arm(
    results: Path, name: str, rewards: list[float], ppl: list[float], cost: dict | None, seed: int = 42
) -> None:
    run = results / f"findings={name},seed={seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      findings: {name}\n")
    (run / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")
    artifact = results.parent / "artifacts" / f"{name}-{seed}"
    artifact.mkdir(parents=True)
    with open(artifact / "responses.jsonl", "w") as handle:
        for i, (r, p) in enumerate(zip(rewards, ppl)):
            handle.write(json.dumps({"prompt": f"p{i}", "response": "x", "reward": r, "ppl_paper": p}) + "\n")
    (run / "metrics.json").write_text(json.dumps({"final": {"artifact": str(artifact)}}))
    (run / "timing.json").write_text(json.dumps({"wall_seconds": 1.0, "stages": {"train_1": cost} if cost else {}}))


def test_findings_table_from_a_sweep_folder(tmp_path: Path) -> None:
    results = tmp_path / "results" / "findings"
    rng = np.random.default_rng(0)
    base = rng.normal(size=40)
    ppl = 10 + rng.random(40)
    _fake_arm(results, "initial", list(base), list(ppl), None)
    _fake_arm(results, "rrhf_dp", list(base + 1.0), list(ppl), {"seconds": 100.0, "peak_rss_mib": 3000.0})
    _fake_arm(
        results, "no_rank", list(base + 1.0 + rng.normal(size=40)), list(ppl), {"seconds": 90.0, "peak_rss_mib": 3000.0}
    )
    _fake_arm(results, "ppo", list(base + 2.0), list(ppl), {"seconds": 400.0, "peak_rss_mib": 5000.0})
    files = write_findings(results, tmp_path / "tables")
    assert {f.name for f in files} >= {"findings.md", "findings.csv", "findings.tex"}
    import pandas as pd

    claims = pd.read_csv(tmp_path / "tables" / "findings.csv")
    verdict = dict(zip(claims["comparison"], claims["verdict"]))
    assert verdict["reward: rrhf_dp > initial"] == "holds"
    assert verdict["reward: no_rank < rrhf_dp"] == "inconclusive"  # noise around the same mean
    assert verdict["reward: rrhf_dp >~ ppo"] == "does not hold"  # PPO is better by 1.0 on every prompt
    assert verdict["seconds: rrhf_dp < ppo"] == "holds"
    assert not any(c.startswith("peak_rss") for c in verdict)  # memory: benchmarks/rrhf_vs_ppo.py
    assert claims.loc[claims["comparison"] == "seconds: rrhf_dp < ppo", "ratio"].item() == pytest.approx(0.25)
    assert (claims["verdict"] == "no run").sum() > 0  # ip2, op, op_kl, best_of_4 did not run
    assert len(claims["claim"].unique()) == len(CLAIMS)
    text = (tmp_path / "tables" / "findings.md").read_text()
    assert "RRHF (DP) raises the reward over the initial policy" in text and "**holds**" in text


@pytest.mark.slow
def test_findings_sweep_runs_every_arm_through_run_py_on_the_tiny_model(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import pandas as pd

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RRHF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "run.py",
        "experiment=findings",
        *TINY_SWEEP,
        "trainer.args.max_steps=3",
        "findings_scale.op_refresh_steps=1",
        "findings_scale.ppo_iterations=2",
        "seed=1",
        f"paths.artifacts={tmp_path}/artifacts",
        f"paths.results={tmp_path}/results",
        f"paths.tables={tmp_path}/tables",
    ]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = {
        OmegaConf.load(h).hydra.runtime.choices.findings: h.parent.parent
        for h in (tmp_path / "results" / "findings").rglob(".hydra/hydra.yaml")
    }
    assert set(runs) == {p.stem for p in (root / "conf" / "findings").glob("*.yaml")}
    assert all((folder / "metrics.json").exists() for folder in runs.values())
    op = json.loads((runs["op_kl"] / "metrics.json").read_text())
    assert [r["step"] for r in op["iterations"][0]["refreshes"]] == [1, 2]
    assert json.loads((runs["ip2"] / "metrics.json").read_text())["iterations"][1]["trained"]
    ppo = json.loads((runs["ppo"] / "metrics.json").read_text())
    assert len(json.loads(Path(ppo["train_log"]).read_text())) == 2  # two PPO rounds
    arms = load_arms(tmp_path / "results" / "findings")
    for arm in ("rrhf_dp", "ppo", "op_kl"):  # the cost of producing each trained policy is recorded
        assert arms[arm].cost("seconds")[0] > 0 and arms[arm].cost("peak_rss_mib")[0] > 100
    assert arms["initial"].cost("seconds") is None  # nothing trained
    claims = pd.read_csv(tmp_path / "tables" / "findings.csv")
    assert len(claims["claim"].unique()) == len(CLAIMS) and "no run" not in set(claims["verdict"])
    assert set(claims["claim_verdict"]) <= {"holds", "does not hold", "inconclusive"}
    assert (tmp_path / "tables" / "table2.tex").exists()  # the ordinary collation runs too


def test_seeds_are_kept_apart_and_the_verdict_covers_them(tmp_path: Path) -> None:
    results = tmp_path / "results" / "findings"
    rng = np.random.default_rng(3)
    base = rng.normal(size=50)
    ppl = list(10 + rng.random(50))
    for seed, shift in ((1, -0.05), (2, -0.04), (3, -0.06)):  # L_rank's removal lowers the reward at every seed
        noise = rng.normal(size=50) * 0.05
        _fake_arm(results, "initial", list(base), ppl, None, seed)
        _fake_arm(
            results, "rrhf_dp", list(base + 1.0 + noise), ppl, {"seconds": 100.0 + seed, "peak_rss_mib": 3e3}, seed
        )
        _fake_arm(
            results,
            "no_rank",
            list(base + 1.0 + noise + shift + rng.normal(size=50) * 0.05),
            ppl,
            {"seconds": 90.0, "peak_rss_mib": 3e3},
            seed,
        )
        # PPO: better than RRHF at one seed, worse at the others, by more than the prompt noise.
        _fake_arm(
            results,
            "ppo",
            list(base + 1.0 + {1: 0.5, 2: -0.4, 3: -0.3}[seed]),
            ppl,
            {"seconds": 400.0, "peak_rss_mib": 5e3},
            seed,
        )
    arms = load_arms(results)
    assert arms["rrhf_dp"].seeds == [1, 2, 3]  # one run per seed, none overwritten
    write_findings(results, tmp_path / "tables")
    import pandas as pd

    claims = pd.read_csv(tmp_path / "tables" / "findings.csv")
    row = claims.set_index("comparison").loc
    assert row["reward: no_rank < rrhf_dp", "verdict"] == "holds"
    assert row["reward: no_rank < rrhf_dp", "seeds"] == 3
    assert row["reward: rrhf_dp >~ ppo", "verdict"] == "holds"  # not below PPO once seeds are resampled
    assert row["seconds: rrhf_dp < ppo", "a"] == pytest.approx(102.0)  # mean over seeds
    table = pd.read_csv(tmp_path / "tables" / "findings_arms.csv").set_index("arm")
    assert table.loc["ppo", "seeds"] == "1 2 3" and table.loc["ppo", "reward_sd"] > 0.3
    assert "± " in (tmp_path / "tables" / "findings.md").read_text()

    _fake_arm(results / "again", "ppo", list(base), ppl, None, 2)  # a second run of one arm at one seed
    with pytest.raises(ValueError, match="ran twice at seed 2"):
        load_arms(results)


@pytest.mark.skipif(__import__("shutil").which("pdflatex") is None, reason="pdflatex not installed")
def test_findings_tex_compiles(tmp_path: Path) -> None:

    results = tmp_path / "results" / "findings"
    _fake_arm(results, "initial", [0.1, 0.2, 0.3], [10.0, 11.0, 12.0], None)
    _fake_arm(results, "rrhf_dp", [0.4, 0.5, 0.6], [10.0, 11.0, 12.0], {"seconds": 1.0, "peak_rss_mib": 500.0})
    write_findings(results, tmp_path / "tables")
    result = compile_table(tmp_path / "tables" / "findings.tex", tmp_path)
    assert result.returncode == 0, result.stdout[-2000:]
