"""Data of the vision-language tasks: captioned images and VQA questions, all local.

- :func:`packaged_captioned_photos`: real photos that ship with packages
  (scikit-image, scikit-learn, matplotlib, mvtb-data) with captions written for them
  (:data:`PHOTO_CAPTIONS`): the default data of the captioning and retrieval tasks.
- :func:`load_caption_annotations`: COCO or Flickr30k Karpathy-split JSON (``{"images":
  [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``) or LAVIS's
  annotation list (``[{"image": "val2014/x.jpg", "caption": [...]}]``), images from a
  local folder.
- :func:`load_vqa_samples`: easy-VQA (packaged) or VQAv2 / OK-VQA / GQA / VizWiz files
  through :mod:`turbo_eval.vqa`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PHOTO_CAPTIONS",
    "VQA_DATASETS",
    "CaptionedImage",
    "VLSample",
    "load_caption_annotations",
    "load_vqa_samples",
    "packaged_captioned_photos",
]


@dataclasses.dataclass(frozen=True)
class VLSample:
    """One image with one text (a caption prompt, a caption or a question).

    Attributes:
        image: an ``(H, W, 3)`` uint8 array or an image file.
        text: the text.
        answers: human answers or reference captions (may be empty).
        key: an id for results (image id, question id).
    """

    image: Any
    text: str
    answers: tuple[str, ...] = ()
    key: str = ""


#: Captions of packaged photos, by the photo's name in :mod:`turbo_eval.assets.images`.
PHOTO_CAPTIONS: dict[str, tuple[str, ...]] = {
    "astronaut": (
        "an astronaut in an orange space suit smiling in front of a flag",
        "a woman astronaut posing with a model of the space shuttle",
    ),
    "china": (
        "a chinese pagoda on a hill above a lake",
        "a tall red and green temple with trees under a blue sky",
    ),
    "grace_hopper": (
        "an old woman in a navy uniform in front of a flag",
        "a portrait of a naval officer wearing a hat",
    ),
    "chelsea": (
        "a close up of an orange tabby cat looking at the camera",
        "the face of a cat with green eyes",
    ),
    "flower": ("an orange dahlia with green leaves", "a close up of a round orange flower"),
    "coffee": (
        "a cup of coffee on a saucer with a spoon",
        "a white cup of coffee on a red saucer",
    ),
    "rocket": (
        "a rocket on the launch pad at night",
        "a rocket standing between two towers under a dark sky",
    ),
    "butterfly": ("a black and white butterfly on a green leaf",),
    "motorcycle_left": ("a red motorcycle parked indoors", "a red motorbike in a garage"),
    "castle": ("a brown street sign pointing to tourist information and the castle",),
    "camera": (
        "a man looking through a camera on a tripod",
        "a black and white photo of a photographer in a field",
    ),
    "hubble_deep_field": ("many stars and galaxies in the dark night sky",),
    "church": ("a white church with a tall tower under a blue sky",),
    "retina": ("a round red image of the back of an eye",),
    "eiffel-1": ("the eiffel tower seen from a park with trees",),
    "coins": ("rows of old coins on a dark background",),
    "page": ("a page of printed text about image segmentation",),
    "flowers1": ("a field of pink and red tulips",),
    "brick": ("a gray brick pavement seen from above",),
    "gravel": ("a close up of gray gravel",),
}


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    """An image (array or file) with its human captions."""

    key: str
    image: Any
    captions: tuple[str, ...]


def packaged_captioned_photos(limit: int | None = None) -> list[CaptionedImage]:
    """The packaged photos that have captions in :data:`PHOTO_CAPTIONS` (fixed order).

    Raises:
        FileNotFoundError: none of the photo packages is installed.
    """
    found = list(_captioned_photos())
    if not found:
        raise FileNotFoundError(
            "no captioned packaged photo found: install scikit-image, scikit-learn or mvtb-data"
        )
    return found if limit is None else found[:limit]


@functools.lru_cache(maxsize=1)
def _captioned_photos() -> tuple[CaptionedImage, ...]:
    # loading every packaged source (a video among them) takes seconds: once per process
    from .assets.images import real_photos

    return tuple(
        CaptionedImage(p.name, p.image, PHOTO_CAPTIONS[p.name])
        for p in real_photos()
        if p.name in PHOTO_CAPTIONS
    )


def _resolve(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"image {relative!r} of the annotations is not under {root}")
    return path


def load_caption_annotations(
    annotations: str | Path,
    images: str | Path,
    split: str = "test",
    limit: int | None = None,
) -> list[CaptionedImage]:
    """Captioned images from a Karpathy-split JSON or a LAVIS annotation list.

    Args:
        annotations: the JSON file.
        images: the folder the image paths are relative to (COCO: the one holding
            ``val2014/``; Flickr30k: the image folder).
        split: Karpathy split to keep (``"test"``, ``"val"``, ``"train"``, ``"restval"``);
            LAVIS files are one split already.
        limit: at most this many images.

    Raises:
        FileNotFoundError: the JSON or an image it names is missing.
        ValueError: the JSON is neither layout, or the split is empty.
    """
    path, root = Path(annotations).expanduser(), Path(images).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no annotation file at {path}")
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    data = json.loads(path.read_text(encoding="utf-8"))
    out: list[CaptionedImage] = []
    if isinstance(data, Mapping) and isinstance(data.get("images"), list):  # Karpathy
        for entry in data["images"]:
            if entry.get("split") != split:
                continue
            relative = str(Path(entry.get("filepath", "")) / entry["filename"])
            key = str(entry.get("cocoid", entry.get("imgid", entry["filename"])))
            captions = tuple(s["raw"] for s in entry.get("sentences", ()))
            out.append(CaptionedImage(key, relative, captions))
    elif isinstance(data, list) and all(isinstance(e, Mapping) and "image" in e for e in data):
        for entry in data:  # LAVIS
            captions = entry.get("caption", ())
            captions = (captions,) if isinstance(captions, str) else tuple(captions)
            out.append(CaptionedImage(str(entry["image"]), str(entry["image"]), captions))
    else:
        raise ValueError(
            f"{path} is neither a Karpathy-split file ({{'images': [...]}}) nor a LAVIS "
            "annotation list ([{'image': ..., 'caption': [...]}])"
        )
    if not out:
        raise ValueError(f"{path} has no images in split {split!r}")
    out = out if limit is None else out[:limit]
    return [dataclasses.replace(c, image=_resolve(root, c.image)) for c in out]


#: ``dataset`` values of the VQA task and the files each needs
VQA_DATASETS: dict[str, tuple[str, ...]] = {
    "easy-vqa": (),
    "vqav2": ("questions", "annotations", "images"),
    "okvqa": ("questions", "annotations", "images"),
    "gqa": ("questions", "images"),
    "vizwiz": ("annotations", "images"),
}


def load_vqa_samples(
    dataset: str,
    paths: Mapping[str, str],
    limit: int,
    image_split: str = "val2014",
) -> list[VLSample]:
    """Questions (with their human answers) as :class:`VLSample` items.

    Args:
        dataset: one of :data:`VQA_DATASETS`.
        paths: ``questions`` / ``annotations`` / ``images`` file and folder paths.
        limit: at most this many questions.
        image_split: the COCO split in VQAv2 / OK-VQA image names.

    Raises:
        ValueError: an unknown dataset or a missing path option (named).
        FileNotFoundError: a file or image that is not there.
    """
    from . import vqa

    if dataset not in VQA_DATASETS:
        raise ValueError(f"dataset must be one of {sorted(VQA_DATASETS)}, got {dataset!r}")
    missing = [key for key in VQA_DATASETS[dataset] if not paths.get(key)]
    if missing:
        raise ValueError(f"dataset {dataset!r} needs the options {missing}")
    if dataset == "easy-vqa":
        from .assets.easy_vqa import load_easy_vqa

        items = load_easy_vqa("test", limit)
        return [VLSample(i.image, i.question, i.answers, i.question_id) for i in items]
    for key in VQA_DATASETS[dataset]:
        if not Path(paths[key]).expanduser().exists():
            raise FileNotFoundError(f"{key}: no file or folder at {paths[key]}")
    files = {k: Path(v).expanduser() for k, v in paths.items() if v}
    items: Sequence[Any]
    if dataset in ("vqav2", "okvqa"):
        items = vqa.load_vqa_v2(
            files["questions"], files["annotations"], files["images"], image_split, limit
        )
    elif dataset == "gqa":
        items = vqa.load_gqa(files["questions"], files["images"], limit)
    else:
        items = vqa.load_vizwiz(files["annotations"], files["images"], limit)
    for item in items:
        if not Path(item.image).is_file():
            raise FileNotFoundError(f"image of question {item.question_id} missing: {item.image}")
    return [VLSample(i.image, i.question, tuple(i.answers), i.question_id) for i in items]
