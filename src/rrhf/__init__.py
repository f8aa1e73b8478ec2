"""RRHF: Rank Responses to align language models with Human Feedback (Yuan et al., NeurIPS 2023)."""

from omegaconf import OmegaConf

# Run folders are named by their overrides (conf/config.yaml); a path among the values must not
# create sub-folders.
if not OmegaConf.has_resolver("dirname_safe"):
    OmegaConf.register_new_resolver("dirname_safe", lambda text: str(text).replace("/", "_"))
