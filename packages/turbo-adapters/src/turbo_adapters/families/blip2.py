"""BLIP-2 and InstructBLIP: the public path of :mod:`turbo_adapters.families.blip.v2`."""

from .blip.v2 import (
    BLIP2,
    BLIP2_LAYER,
    CROSS_SITE,
    INSTRUCTBLIP,
    Blip2Adapter,
    InstructBlipAdapter,
    use_cross_modal_guidance,
    use_size_bias_downstream,
)

__all__ = [
    "BLIP2",
    "BLIP2_LAYER",
    "CROSS_SITE",
    "INSTRUCTBLIP",
    "Blip2Adapter",
    "InstructBlipAdapter",
    "use_cross_modal_guidance",
    "use_size_bias_downstream",
]
