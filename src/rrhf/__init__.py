"""RRHF: Rank Responses to align language models with Human Feedback (Yuan et al., NeurIPS 2023)."""

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

# The repository: configs, the shipped offline data and the paper's reference numbers live under it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A config value or settings file that cannot run: the message names the key (or the file and line), the
    value and what is allowed. Here rather than in `rrhf.config_checks`, since pieces below the config checks
    (the Hub lock file in `rrhf.hub`) raise it too."""


def dirname_safe(text: object) -> str:
    """One folder name for a run's `name` or its overrides, never two texts in one folder, never outside.

    A "/" among the values must not create sub-folders (nor `..` climb out of `paths.results`), so it
    becomes "_", and "." or ".." is spelled with "_"; a long list of overrides must not pass the file-name
    limit (255 bytes), so it is cut. Wherever that changed the text, a hash of the whole text is appended:
    `a_b/t.jsonl` and `a/b_t.jsonl` get different folders. A text that needed no change is its own name.
    """
    original = str(text)
    name = original.replace("/", "_")
    if name in (".", ".."):
        name = name.replace(".", "_")
    digest = hashlib.sha256(original.encode()).hexdigest()
    if len(name.encode()) > 200:
        return name.encode()[:180].decode(errors="ignore") + "-" + digest[:16]
    return name if name == original else f"{name}-{digest[:10]}"


if not OmegaConf.has_resolver("dirname_safe"):
    OmegaConf.register_new_resolver("dirname_safe", dirname_safe)
