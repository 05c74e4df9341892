"""The entry point lmms-eval loads (group ``lmms_eval.models``): the ``turbo`` model's manifest.

Called by lmms-eval's model registry only, so importing lmms-eval here is safe; the class
itself is imported when a run asks for ``--model turbo``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_ID", "manifest"]

MODEL_ID = "turbo"


def manifest() -> Any:
    """``ModelManifest`` of ``turbo`` -> :class:`turbo_eval.lmms.model.TurboVLM`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="turbo_eval.lmms.model.TurboVLM")
