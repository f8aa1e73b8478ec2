"""benchmarks/gpu_check.py, ready for the first GPU: on a CPU its CUDA rows say why they are skipped, and with
--tiny it runs its whole code path (sampling comparison, training steps, the fsdp and ZeRO-3 profiles, the 7B
section's full / LoRA / QLoRA steps beside rrhf.memory's estimates) here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: run the check itself")
def test_without_cuda_every_gpu_row_says_why_it_is_skipped(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "RRHF_CACHE": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("\ncheck")[1]
    assert table.count("skipped: no CUDA device") == 7  # sampling, train step, 2 profiles, 3 rows of the 7B section


@pytest.mark.slow
def test_tiny_run_exercises_every_check(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**ENV, "RRHF_CACHE": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = done.stdout.split("\ncheck")[1].splitlines()[1:]
    results = {line.split("  ")[0]: line for line in rows if line.strip() and not line.endswith("in all")}
    assert any("identical" in r for r in results.values())
    assert sum("ms/step" in r for r in results.values()) >= 2
    for profile in ("fsdp", "deepspeed_zero3"):
        assert any(f"trainer={profile}" in k and "runs;" in r for k, r in results.items()), results
    seven_b = [line for line in rows if line.startswith("7B train step")]
    assert len(seven_b) == 3, rows
    full, lora, qlora = seven_b
    assert "full" in full and "ms/step" in full and "estimate" in full
    assert "LoRA" in lora and ("ms/step" in lora and "estimate" in lora or "skipped: peft not installed" in lora)
    assert "QLoRA" in qlora and ("ms/step" in qlora or "skipped:" in qlora)
