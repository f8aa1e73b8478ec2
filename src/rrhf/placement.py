"""Where a stage's models run and in which precision: one rule for every model the pipeline loads.

The accelerator when there is one (this process's own GPU under torchrun or SLURM: `cuda:LOCAL_RANK`),
else the CPU. Inference in bf16 on GPUs and fp32 on CPUs, unless the config says otherwise: the top-level
`device` and `dtype` keys for every model, `reward.dtype` for the reward model (gptj-rm-static scores in
fp16, as the authors ran it). Training keeps fp32 weights and lets its profile's mixed precision decide.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    def key(self) -> dict[str, str]:
        """What of the placement changes a stage's results: the kind of device and the precision (not which
        GPU of a node), for the stage's cache key."""
        return {"device": self.device.type, "dtype": str(self.dtype).removeprefix("torch.")}


def local_device(choice: str = "auto") -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK of a distributed launch) when CUDA is there, else the CPU."""
    if choice != "auto":
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """The placement a config asks for (`device`, `dtype`: "auto" or a name), resolved on this machine."""
    where = local_device(device)
    if dtype == "auto":
        return Placement(where, torch.bfloat16 if where.type == "cuda" else torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected auto or one of {sorted(DTYPES)}")
    if where.type == "cpu" and dtype == "float16":
        # An accelerator precision (gptj-rm-static's on GPUs): CPUs lack fp16 kernels, so they compute in fp32.
        return Placement(where, torch.float32)
    return Placement(where, DTYPES[dtype])


def from_config(cfg: Any, *, dtype: str | None = None) -> Placement:
    """The placement of a run's config (its top-level `device` and `dtype`); `dtype` overrides the latter
    where a model has its own (e.g. `reward.dtype`), unless that is "auto"."""
    chosen = dtype if dtype not in (None, "auto") else cfg.get("dtype", "auto")
    return placement(cfg.get("device", "auto"), chosen)


# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_AT_TOP = 1 << 30  # freed memory above the heap's last block that malloc keeps rather than returns


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep the memory of freed CPU tensors for the next ones (True where it applied).

    By default glibc serves every allocation over 32 MiB with its own mmap and unmaps it when freed, so each
    training step's large temporaries (a batch's logits over the vocabulary and their gradients) arrive as
    fresh pages that the kernel must fault in and zero again. Served from the heap and kept there, they are
    reused: a CPU training step of the embedded policy took about 0.7x the time on a 2-core machine
    (benchmarks/cpu_allocator.py). Only where the memory goes changes, never a computed value; the price is
    a higher resident size, since freed blocks inside the heap are not returned to the system. Linux with
    glibc only; elsewhere nothing is changed. There is no allocator setting in torch for this, hence mallopt.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_AT_TOP))


def trainer_device_args(args: dict[str, Any], where: torch.device) -> dict[str, Any]:
    """A trainer profile's arguments made runnable where the run is: on a CPU the Trainer must be told so
    (`use_cpu`; bf16 then runs as autocast around fp32 weights) and tf32, a GPU matmul mode, does not apply.
    GPU profiles thereby run unchanged on CPU ranks (gloo), which is how their distributed path is tested."""
    if where.type != "cpu":
        return args
    out = {**args, "use_cpu": True}
    if out.get("tf32"):
        out["tf32"] = False
    return out
