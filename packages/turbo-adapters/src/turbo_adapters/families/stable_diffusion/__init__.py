"""Stable Diffusion (1.x, 2.x, SDXL, ControlNet): Turbo merge-and-restore in every UNet block.

The family is a package: :mod:`.adapter` (the adapter, its patch and presets), :mod:`.hooks`
(the merge-and-restore hooks around ``attn1`` / ``attn2`` / ``ff``), :mod:`.settings`
(:class:`SDSettings`) and :mod:`.guide` (the text's cross-attention over the image tokens).
"""

from .adapter import (
    DEFAULT_ALPHA,
    PRESETS,
    RatioClippedWarning,
    SDSettings,
    StableDiffusionAdapter,
    StableDiffusionPatch,
    default_settings,
)

__all__ = [
    "DEFAULT_ALPHA",
    "PRESETS",
    "RatioClippedWarning",
    "SDSettings",
    "StableDiffusionAdapter",
    "StableDiffusionPatch",
    "default_settings",
]
