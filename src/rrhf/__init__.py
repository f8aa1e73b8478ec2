"""RRHF: Rank Responses to align language models with Human Feedback (Yuan et al., NeurIPS 2023)."""

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

# The repository: configs, the shipped offline data and the paper's reference numbers live under it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def dirname_safe(text: object) -> str:
    """A run folder name from its overrides: a path among the values must not create sub-folders, and a
    long list of overrides must not pass the file-name limit (255 bytes), so it is cut and a hash added."""
    name = str(text).replace("/", "_")
    if len(name.encode()) > 200:
        name = name.encode()[:180].decode(errors="ignore") + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return name


if not OmegaConf.has_resolver("dirname_safe"):
    OmegaConf.register_new_resolver("dirname_safe", dirname_safe)
