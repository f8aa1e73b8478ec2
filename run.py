"""Entry point: `python run.py [group=option ...]`, or `python run.py -m ...` for a sweep."""

import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

import rrhf  # noqa: F401  (registers the config resolvers)

log = logging.getLogger("rrhf")


class MissingHubItems(CompactHydraException):
    """Hydra prints this exception's message alone, without a traceback (that is in the run's FAILED file)."""


class DoesNotFitRefused(CompactHydraException):
    """A stage's planned memory exceeds the device's (rrhf.memory); Hydra prints the message alone."""


class RunFolderRefused(CompactHydraException):
    """The run folder holds a finished run this launch must not overwrite; Hydra prints the message alone."""


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from rrhf.hub import HubItemsMissing
    from rrhf.launch import end_with_launcher, export_torch_env_from_slurm, rank
    from rrhf.memory import DoesNotFit

    end_with_launcher()  # before the slow imports: a rank must not outlive a torchrun killed outright
    from rrhf.pipeline import RunFolderTaken, check_run_folder, run

    # A SLURM job with one task per GPU (hydra/launcher=slurm_gpu): each task becomes one torch rank.
    export_torch_env_from_slurm()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    failed, started = run_dir / "FAILED", run_dir / "STARTED"
    try:
        check_run_folder(run_dir)
    except RunFolderTaken as error:  # no marker: FAILED or STARTED would hide the finished run from the tables
        print(f"rrhf: {error}", file=sys.stderr, flush=True)
        raise RunFolderRefused(str(error)) from None
    if rank() == 0:  # removed when the run ends: one left behind marks a run killed (or still running)
        started.write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} on {socket.gethostname()}\n")
    try:
        run(cfg, run_dir)
    except BaseException as error:
        # The marker lets the collator list this run as a gap; the error still fails the job.
        failed.write_text(traceback.format_exc())
        started.unlink(missing_ok=True)
        if isinstance(error, HubItemsMissing):  # one line on the terminal, each job of a sweep its own
            print(f"rrhf: {run_dir}: {error}", file=sys.stderr, flush=True)
            raise MissingHubItems(str(error)) from None
        if isinstance(error, DoesNotFit):  # the estimate and the fixes, without a traceback
            print(f"rrhf: {run_dir}: {error}", file=sys.stderr, flush=True)
            raise DoesNotFitRefused(str(error)) from None
        raise
    failed.unlink(missing_ok=True)
    started.unlink(missing_ok=True)
    if cfg.collate and hydra_cfg.mode.name == "RUN" and rank() == 0:
        from rrhf.tables import collate_after_runs

        # The run is finished: a problem with the tables is logged as a warning, not this run's failure.
        collate_after_runs(Path(cfg.paths.results), Path(cfg.paths.tables))


if __name__ == "__main__":
    main()
