"""VQA data from local files: one :class:`VQAItem` for every format.

Formats (all read from local paths, nothing downloaded):

- VQAv2 / OK-VQA: a questions JSON (``{"questions": [{"question_id", "image_id",
  "question"}]}``) and an annotations JSON (``{"annotations": [{"question_id",
  "answers": [{"answer"}]}]}``); images ``COCO_<split>_<image_id:012d>.jpg`` in a folder.
- GQA: ``{question_id: {"imageId", "question", "answer"}}``; images ``<imageId>.jpg``.
- VizWiz: ``[{"image", "question", "answers": [{"answer"}]}]``; images by file name.
- easy-vqa (the ``easy-vqa`` package, real packaged data):
  :func:`turbo_eval.assets.easy_vqa.load_easy_vqa`, also as :class:`VQAItem`.

The metrics (the VQA accuracy, answer agreement, first-token KL) are in
:mod:`turbo_eval.vl_metrics`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

__all__ = ["VQAItem", "load_gqa", "load_vizwiz", "load_vqa_v2"]


@dataclasses.dataclass(frozen=True)
class VQAItem:
    """One question: the image (a file, or its ``(H, W, 3)`` uint8 pixels), the question,
    the human answers (possibly one) and an id unique within its data set."""

    image: Path | np.ndarray
    question: str
    answers: tuple[str, ...]
    question_id: str = ""


def _json(path: str | Path) -> object:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_vqa_v2(
    questions: str | Path, annotations: str | Path, images: str | Path, split: str = "val2014",
    limit: int | None = None,
) -> list[VQAItem]:  # fmt: skip
    """VQAv2 or OK-VQA (same layout) from local files."""
    answers = {
        a["question_id"]: tuple(x["answer"] for x in a["answers"])
        for a in _json(annotations)["annotations"]  # type: ignore[index]
    }
    items = []
    for q in _json(questions)["questions"]:  # type: ignore[index]
        image = Path(images) / f"COCO_{split}_{int(q['image_id']):012d}.jpg"
        items.append(
            VQAItem(image, q["question"], answers.get(q["question_id"], ()), str(q["question_id"]))
        )
    return items[:limit]


def load_gqa(questions: str | Path, images: str | Path, limit: int | None = None) -> list[VQAItem]:
    """GQA balanced questions (one answer each) from local files."""
    data = _json(questions)
    items = [
        VQAItem(Path(images) / f"{q['imageId']}.jpg", q["question"], (q["answer"],), str(key))
        for key, q in data.items()  # type: ignore[union-attr]
    ]
    return items[:limit]


def load_vizwiz(
    annotations: str | Path, images: str | Path, limit: int | None = None
) -> list[VQAItem]:
    """VizWiz VQA from local files."""
    items = [
        VQAItem(
            Path(images) / q["image"],
            q["question"],
            tuple(a["answer"] for a in q.get("answers", ())),
            q["image"],
        )
        for q in _json(annotations)  # type: ignore[union-attr]
    ]
    return items[:limit]
