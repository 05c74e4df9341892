"""Imports the adapter modules shipped with turbo-adapters so they register themselves.

Each module imports its model library lazily, inside ``matches`` and ``patch``, so
importing them costs nothing when the library is not installed.
"""

from . import vit_timm  # noqa: F401
from . import bert_hf  # noqa: F401
from . import vit_torchvision  # noqa: F401
from . import eva  # noqa: F401
from . import vit_hf  # noqa: F401
from . import dinov2_hf  # noqa: F401
from . import clip  # noqa: F401
