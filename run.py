"""Entry point: `python run.py [group=option ...]`, or `python run.py -m ...` for a sweep."""

import logging
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import rrhf  # noqa: F401  (registers the config resolvers)

log = logging.getLogger("rrhf")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from rrhf.launch import export_torch_env_from_slurm, rank
    from rrhf.pipeline import run

    # A SLURM job with one task per GPU (hydra/launcher=slurm_gpu): each task becomes one torch rank.
    export_torch_env_from_slurm()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    failed = run_dir / "FAILED"
    try:
        run(cfg, run_dir)
    except BaseException:
        # The marker lets the collator list this run as a gap; the error still fails the job.
        failed.write_text(traceback.format_exc())
        raise
    failed.unlink(missing_ok=True)
    if cfg.collate and hydra_cfg.mode.name == "RUN" and rank() == 0:
        from rrhf.tables import collate

        collate(Path(cfg.paths.results), Path(cfg.paths.tables))


if __name__ == "__main__":
    main()
