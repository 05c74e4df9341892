"""The easy-VQA data set (PyPI ``easy-vqa``): 5,000 rendered shape images, 48,248 questions.

Real local VQA data for the VQA task's tests and an optional suite entry. Each question
has one answer; :func:`load_easy_vqa` gives it in the VQAv2 form (a list of human
answers, here that answer repeated ten times) so the VQAv2 accuracy applies unchanged.
"""

from __future__ import annotations

import numpy as np

from ..vqa import VQAItem

__all__ = ["VQAItem", "load_easy_vqa"]

_SPLITS = ("train", "test")


def load_easy_vqa(split: str = "test", limit: int | None = None) -> list[VQAItem]:
    """Questions of ``split`` in the package's order, at most ``limit`` of them.

    Each item's image is its ``(H, W, 3)`` uint8 pixels; its id is
    ``"<image id>/<question index>"``.

    Raises:
        ModuleNotFoundError: when ``easy-vqa`` is not installed (``pip install easy-vqa``).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")
    import easy_vqa
    from PIL import Image

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    count = len(questions) if limit is None else min(limit, len(questions))
    images: dict[int, np.ndarray] = {}
    items = []
    for n, (question, answer, image_id) in enumerate(
        zip(questions[:count], answers[:count], image_ids[:count], strict=True)
    ):
        if image_id not in images:
            with Image.open(paths[image_id]) as image:
                images[image_id] = np.asarray(image.convert("RGB"))
        items.append(VQAItem(images[image_id], question, (answer,) * 10, f"{image_id}/{n}"))
    return items
