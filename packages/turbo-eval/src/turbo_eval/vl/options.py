"""The model options a vision-language model reads, and their checks (the loading's
module docstring, :mod:`turbo_eval.vl.loading`, says what each means)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["VL_OPTIONS", "check_options"]

_OPTION_CHOICES = {
    "weights": ("auto", "random", "pretrained"),
    "init": ("scaled", "library"),
    "llava_mode": ("tower", "llm", "both"),
    "llm_method": ("prune", "merge"),
    "cross_reduce": ("merge", "prune"),
}
#: Every model option a VL model reads (the module docstring says what each means).
VL_OPTIONS = (
    *_OPTION_CHOICES,
    "init_seed",
    "config",
    "llm_layer",
    "llm_keep",
    "cross_vision_share",
    "minigpt_checkpoint",
    "eva_weights",
    "llama_dir",
)


def check_options(options: Mapping[str, Any]) -> None:
    for key, allowed in _OPTION_CHOICES.items():
        if key in options and options[key] not in allowed:
            raise ValueError(
                f"model option {key} must be one of {list(allowed)}, got {options[key]!r}"
            )
    for key in ("init_seed", "llm_layer"):
        value = options.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"model option {key} must be an int >= 0, got {value!r}")
    keep = options.get("llm_keep", 0.5)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"model option llm_keep must be a number in (0, 1], got {keep!r}")
    share = options.get("cross_vision_share", 0.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ValueError(
            f"model option cross_vision_share must be a number in [0, 1], got {share!r}"
        )
    if not isinstance(options.get("config", {}), Mapping):
        raise ValueError(f"model option config must be a table, got {options['config']!r}")
