"""The BLIP family: BLIP (v1), BLIP-2 and InstructBLIP, and the options on their text side.

The family is a package: :mod:`.v1` (BLIP's adapter, its cross-modal guidance and
size bias on the text side), :mod:`.v2` (BLIP-2 and InstructBLIP's adapters and the
Q-Former options) and :mod:`.guided` (the cross-modal reduction both share).
``turbo_adapters.families.blip`` keeps exporting BLIP's API;
``turbo_adapters.families.blip2`` exports BLIP-2's.
"""

from .v1 import (
    BLIP,
    BLIP_ATTENTION,
    BLIP_LAYER,
    CROSS_SITE,
    BlipAdapter,
    install_blip_attention,
    use_cross_modal_guidance,
    use_size_bias_downstream,
)

__all__ = [
    "BLIP",
    "BLIP_ATTENTION",
    "BLIP_LAYER",
    "CROSS_SITE",
    "BlipAdapter",
    "install_blip_attention",
    "use_cross_modal_guidance",
    "use_size_bias_downstream",
]
