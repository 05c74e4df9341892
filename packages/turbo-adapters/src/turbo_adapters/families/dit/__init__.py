"""Diffusion transformers (PixArt-alpha/Sigma, SD3 / SD3.5, FLUX.1): merge-and-restore of the
image tokens, through pipelines and bare transformers.

The mechanism is the Stable Diffusion family's (:mod:`..stable_diffusion.hooks`) with
the block layouts of :mod:`..stable_diffusion.layout`: text tokens never merge, the
joint attentions restore their image output, FLUX's rotary rows follow the merge (per
batch row when rows keep different tokens). Redundancy alone by default; the
``"dit-semantic"`` preset adds the text's attention over the image (see
:mod:`.adapter`).
"""

from .adapter import (
    DIT_PRESETS,
    DIT_SEMANTIC_ALPHA,
    DiTAdapter,
    FluxAdapter,
    PixArtAdapter,
    SanaAdapter,
    SD3Adapter,
    dit_default_settings,
)

__all__ = [
    "DIT_PRESETS",
    "DIT_SEMANTIC_ALPHA",
    "DiTAdapter",
    "FluxAdapter",
    "PixArtAdapter",
    "SD3Adapter",
    "SanaAdapter",
    "dit_default_settings",
]
