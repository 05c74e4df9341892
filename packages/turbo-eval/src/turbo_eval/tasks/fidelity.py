"""Embedding fidelity: cosine between patched and unpatched CLS embeddings of real photos."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from .base import Progress, Task, register_task


@register_task
class FidelityTask(Task):
    """How close the patched model's embedding stays to the unpatched one (1 = identical).

    Photos: scikit-image, scikit-learn, matplotlib and mvtb-data samples that ship
    offline, or every image under ``folder``.
    """

    kind = "fidelity"
    metric = "cosine"
    item_score = "cosine"
    options: ClassVar[dict[str, tuple[type, Any]]] = {"max_images": (int, 40), "folder": (str, "")}

    def prepare(self, progress: Progress) -> dict[str, Any]:
        from ..assets.images import load_image_files, real_photos

        if self.config["folder"]:
            photos = load_image_files(self.config["folder"], int(self.config["max_images"]))
        else:
            photos = real_photos(max_images=int(self.config["max_images"]))
        if not photos:
            raise RuntimeError("no photos found: install scikit-image, scikit-learn or mvtb-data")
        self.images = [p.image for p in photos]
        sources = sorted({p.source for p in photos})
        self.model.set_method(None)  # the runner sets each cell's method before evaluate
        self.reference = self.batched_features(self.images, progress, "fidelity features")
        return {"images": len(self.images), "sources": sources}

    def evaluate(self, progress: Progress) -> dict[str, Any]:
        import torch.nn.functional as F

        from ..metrics import cosine_fidelity

        features = self.batched_features(self.images, progress, "fidelity features")
        metrics: dict[str, Any] = cosine_fidelity(features, self.reference)
        cosine = F.cosine_similarity(features.float(), self.reference.float(), dim=-1)
        return {**metrics, "items": {"cosine": cosine.tolist()}}

    def speed_items(self) -> Sequence[Any]:
        return self.images
