"""Experiment tracking: what a run measures goes to wandb as well as to its JSON files.

One wandb run per pipeline run (a Hydra job): named by its overrides (its folder name under
results/<name>/) and grouped by `name`, so a sweep is one wandb group. It holds the training curves (the
Trainer's wandb callback reuses the open run), every PPO round and OP refresh as they happen, and at the
end the evaluation metrics and sample statistics of metrics.json. The switch is the trainer's
`report_to`: a run whose trainer reports to wandb tracks everything (experiment=smoke turns it off).

wandb follows the user's set-up: WANDB_MODE (online, offline, disabled) and their login (WANDB_API_KEY,
or `wandb login`'s entry in ~/.netrc). With neither a mode nor a login, where wandb would stop at once,
it logs offline into the run's folder and says so; `wandb sync <folder>/wandb/offline-run-*` uploads it
later. Only rank 0 logs. Every function here is a no-op when no run is open.
"""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rrhf.launch import rank

_log = logging.getLogger(__name__)

PROJECT = "rrhf"  # WANDB_PROJECT overrides it


def logged_in() -> bool:
    """Whether wandb finds credentials: an API key or identity token in the environment, or a netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reports_to_wandb(report_to: list[str] | str | None) -> bool:
    """Whether a trainer's `report_to` (one name, a list of names, or None) includes wandb."""
    return "wandb" in ([report_to] if isinstance(report_to, str) else list(report_to or []))


def fallback_mode() -> str | None:
    """The mode to set when the user set none: None where wandb decides (WANDB_MODE set, or logged in),
    "offline" where it would otherwise fail for want of a key."""
    if os.environ.get("WANDB_MODE") or logged_in():
        return None
    _log.warning(
        "wandb: no WANDB_MODE and no login (WANDB_API_KEY or `wandb login`): logging offline; "
        "`wandb sync` uploads the run later, WANDB_MODE=disabled turns it off"
    )
    return "offline"


def _wandb() -> Any | None:
    """The wandb module when a run is open in this process, else None."""
    wandb = sys.modules.get("wandb")  # never imported just to find that nothing is open
    return wandb if wandb is not None and wandb.run is not None else None


def active() -> bool:
    return _wandb() is not None


def _wanted(cfg: Any) -> bool:
    return reports_to_wandb(cfg.trainer.args.get("report_to"))


def start(cfg: Any, run_dir: Path) -> None:
    """Open this pipeline run's wandb run (rank 0, when the trainer reports to wandb)."""
    if rank() != 0 or not _wanted(cfg):
        return
    import wandb
    from omegaconf import OmegaConf

    if wandb.run is not None:  # left open by a job of this process that failed
        wandb.finish(exit_code=1)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    wandb.init(
        project=os.environ.get("WANDB_PROJECT", PROJECT),
        group=str(cfg.name),
        name=run_dir.name,
        job_type=str(cfg.method.name),
        dir=str(run_dir),
        mode=fallback_mode(),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def log(values: Mapping[str, Any], prefix: str = "") -> None:
    """Log the scalar values (nested dicts flattened into a/b keys) to the open run."""
    wandb = _wandb()
    if wandb is not None:
        wandb.log(scalars(values, prefix))


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dicts flattened into prefix/a/b keys; numbers kept, everything else (paths, text) dropped."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out |= scalars(value, name)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
    return out


def finish(metrics: Mapping[str, Any]) -> None:
    """Put a pipeline run's results into its wandb run's summary (IP-n: each iteration logged too); close it."""
    wandb = _wandb()
    if wandb is None:
        return
    for i, iteration in enumerate(metrics.get("iterations") or [], start=1):
        wandb.log({"iteration": i, **scalars({k: iteration[k] for k in ("samples", "trained") if k in iteration})})
    keep = ("initial", "final", "dataset", "samples", "reward_model_accuracy")
    wandb.run.summary.update(scalars({k: metrics[k] for k in keep if k in metrics}))
    wandb.finish()


@contextlib.contextmanager
def trainer_run(report_to: list[str] | str | None, output_dir: Path) -> Iterator[None]:
    """Around a Trainer's training: the Trainer's wandb callback logs into the pipeline's open run, or, when
    none is open (training called on its own), opens its own in `output_dir`, closed here so the next
    training of the process starts its own and the folder can move once the stage completes."""
    wanted = reports_to_wandb(report_to)
    if not wanted or active():
        yield
        return
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT")}
    if mode := fallback_mode():
        os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_DIR", str(output_dir))
    os.environ.setdefault("WANDB_PROJECT", PROJECT)
    try:
        yield
    finally:
        if (wandb := _wandb()) is not None:
            wandb.finish()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
