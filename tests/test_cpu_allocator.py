"""`rrhf.placement.keep_freed_cpu_memory`: large CPU tensors come from the heap (and so are reused) once it
applies, from their own mappings before; a run on the CPU applies it unless `cpu_allocator=system`; and the
allocator benchmark computes the same log-probs under both variants."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rrhf.assets import build_tiny_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# In a fresh process (the setting holds for the whole process): is a 64 MiB tensor inside [heap]?
_PROBE = textwrap.dedent(
    """
    import sys, torch
    from rrhf.placement import keep_freed_cpu_memory
    applied = keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
    tensor = torch.empty(16 * 2**20, dtype=torch.float32)
    ptr = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        span, *rest = line.split()
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= ptr < high:
            print(applied, rest[-1] == "[heap]")
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc on Linux only")
@pytest.mark.parametrize("variant, expected", [("keep", "True True"), ("system", "False False")])
def test_large_tensors_come_from_the_heap_once_applied(variant: str, expected: str) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE, variant], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == expected


@pytest.mark.parametrize("device, setting, applied", [("cpu", None, True), ("cpu", "system", False)])
def test_a_cpu_run_keeps_freed_memory_unless_told_not_to(monkeypatch, device, setting, applied) -> None:
    from omegaconf import OmegaConf

    from rrhf import pipeline, placement

    calls = []
    monkeypatch.setattr(placement, "keep_freed_cpu_memory", lambda: calls.append(True) or True)
    cfg = OmegaConf.create({"device": device, "dtype": "auto", "threads": None})
    if setting:
        cfg.cpu_allocator = setting
    pipeline._tune_process(cfg)
    assert bool(calls) is applied


def test_the_benchmark_computes_the_same_logprobs_either_way(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("cpu_allocator", BENCHMARKS / "cpu_allocator.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tmp_path / "tiny"
    build_tiny_model(model)
    # The system variant first: in this process the setting cannot be undone.
    system = bench.one_variant(str(model), steps=2, keep_freed=False)
    kept = bench.one_variant(str(model), steps=2, keep_freed=True)
    assert kept["applied"] is sys.platform.startswith("linux")
    assert kept["checksum"] == system["checksum"] and len(kept["checksum"]) == 3
