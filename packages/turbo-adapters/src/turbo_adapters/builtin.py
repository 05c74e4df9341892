"""Imports the adapter modules shipped with turbo-adapters so they register themselves.

Order matters only for `adapter_for_model` (the first adapter whose class check passes).

Each module imports its model library lazily, inside ``matches`` and ``patch``, so
importing them costs nothing when the library is not installed.
"""

# ruff: noqa: I001  (registration order is deliberate; see above)
from . import vit_timm  # noqa: F401
from . import vit_torchvision  # noqa: F401
from . import vit_hf  # noqa: F401
from . import dinov2_hf  # noqa: F401
from . import clip  # noqa: F401
from . import bert_hf  # noqa: F401
from . import eva  # noqa: F401
from . import stable_diffusion  # noqa: F401
