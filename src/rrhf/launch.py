"""This process's place in a launch: its rank, the number of ranks, and which launch it belongs to.

A run is one process (`python run.py`), several under torchrun (`torchrun --nproc-per-node N run.py`), or
one SLURM task per GPU (the `slurm_gpu` launcher profile, `sweeps/multinode.sbatch`), where
`export_torch_env_from_slurm` turns the SLURM task variables into the torch distributed ones before anything
reads them. Every rank runs the whole pipeline; the stages divide their work by `rank()` and `world_size()`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time


def rank() -> int:
    """This process's rank in a torchrun / SLURM launch (0 when launched alone)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_id() -> str:
    """A name that every rank of this launch shares and that differs between launches (a requeued or
    restarted job is a new launch): the stages' rank meeting points carry it, so a mark left by a killed
    launch is never taken for one of this launch."""
    env = os.environ
    if env.get("RRHF_LAUNCH_ID"):
        return env["RRHF_LAUNCH_ID"]
    if "TORCHELASTIC_RUN_ID" in env:  # torchrun
        restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        if env["TORCHELASTIC_RUN_ID"] not in ("", "none"):
            return f"{env['TORCHELASTIC_RUN_ID']}r{restart}"
        # One node without a rendezvous id: the workers are the children of one agent process.
        return f"agent{os.getppid()}r{restart}"
    if env.get("SLURM_JOB_ID"):  # one SLURM task per rank; a requeued job counts its restarts
        return f"slurm{env['SLURM_JOB_ID']}r{env.get('SLURM_RESTART_COUNT', '0')}"
    if world_size() > 1:  # another launcher: its rendezvous address is what the ranks share
        return f"{env.get('MASTER_ADDR', 'local')}-{env.get('MASTER_PORT', '0')}"
    return f"pid{os.getpid()}"


def export_torch_env_from_slurm() -> bool:
    """In a SLURM job step with several tasks and no torch launcher, set RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT from the SLURM variables (each task keeps seeing all GPUs of its node and uses
    the one of its local rank: `rrhf.placement`). Returns whether it did."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2 or "SLURM_PROCID" not in os.environ:
        return False
    from submitit.helpers import TorchDistributedEnvironment

    # CUDA_VISIBLE_DEVICES is left alone: the HF Trainer places rank r on cuda:LOCAL_RANK of all the GPUs.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCHER_CHECK_SECONDS = 1.0


def end_with_launcher() -> bool:
    """Under torchrun, end this rank as soon as the launcher (its parent process) ends. Returns whether it will.

    torchrun stops its workers when it is stopped politely, or when one of them fails; a launcher that is killed
    outright (SIGKILL, the OOM killer) stops nothing, and its workers would run on without it (into a rendezvous
    that never comes) while holding their stage locks. On Linux the kernel sends this rank SIGKILL when the
    launcher ends (prctl PR_SET_PDEATHSIG); elsewhere, and as a fallback, a thread checks every second that the
    parent is still the launcher. A plain `python run.py` is left alone: it may outlive its shell on purpose.
    Either way the rank ends as if preempted, and a rerun resumes its partial work.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    launcher = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            print(
                f"rrhf: rank {rank()}: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); watching "
                "the launcher from a thread instead",
                file=sys.stderr,
                flush=True,
            )
    threading.Thread(target=_watch_launcher, args=(launcher,), name="rrhf-launcher-watch", daemon=True).start()
    return True


def _watch_launcher(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(LAUNCHER_CHECK_SECONDS)
    _launcher_gone(launcher)


def _launcher_gone(launcher: int) -> None:
    try:
        os.write(2, f"rrhf: rank {rank()}: the launcher (pid {launcher}) has ended; ending this rank\n".encode())
    except OSError:  # nobody reads our stderr any more
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(stage: str) -> None:
    """Die at once, as a preempted job does, when RRHF_CRASH_AT names this stage.

    For the crash tests: each stage calls it after some of its work is saved, so a rerun must resume
    from a partial artifact and still end where an uninterrupted run ends. RRHF_CRASH_RANK limits it to
    one rank of a multi-rank launch.
    """
    if os.environ.get("RRHF_CRASH_AT") == stage and os.environ.get("RRHF_CRASH_RANK", str(rank())) == str(rank()):
        os.kill(os.getpid(), signal.SIGKILL)
