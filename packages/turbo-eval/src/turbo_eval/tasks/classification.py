"""Image classification top-1 on a local image folder (e.g. ImageNet-1k validation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .base import Progress, Task, register_task


@register_task
class ClassificationTask(Task):
    """Top-1 of a classifier on ``root`` laid out as one sub-folder per class.

    Class indices follow the sorted sub-folder names (the ImageNet synset order when
    the folders are the synset ids), unless ``labels_offset`` shifts them.
    """

    kind = "classification"
    metric = "top1"
    item_score = "correct"
    options: ClassVar[dict[str, tuple[type, Any]]] = {
        "root": (str, ""),
        "limit": (int, 0),
        "labels_offset": (int, 0),
    }

    @classmethod
    def validate(cls, options: Any) -> list[tuple[str | None, str]]:
        problems = super().validate(options)
        if not options.get("root"):
            problems.append(("root", "the folder with one sub-folder per class is required"))
        return problems

    def prepare(self, progress: Progress) -> dict[str, Any]:
        from ..assets.labelled import load_image_folder

        data = load_image_folder(self.config["root"], limit=int(self.config["limit"]) or None)
        self.images = list(data.images)
        self.labels = torch.as_tensor(data.labels) + int(self.config["labels_offset"])
        return {
            "dataset": str(self.config["root"]),
            "images": len(self.images),
            "classes": len(data.class_names),
        }

    def evaluate(self, progress: Progress) -> dict[str, Any]:
        from ..distributed import map_batches

        logits = map_batches(
            self.images, self.batch_size, self.model.logits, progress, "classification"
        )
        correct = (logits.argmax(-1) == self.labels).float()
        probability = logits.softmax(dim=-1).gather(1, self.labels[:, None]).squeeze(1)
        return {
            "top1": float(correct.mean()),
            "items": {"correct": correct.tolist(), "score": probability.tolist()},
        }

    def speed_items(self) -> Sequence[Any]:
        return self.images
