"""Real photos that install with packages: scikit-image, scikit-learn, matplotlib, mvtb-data
(its photos, its campus/mosaic/seq folders and frames of its traffic video)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "NamedImage",
    "RealPhotos",
    "SkippedImage",
    "load_image_files",
    "load_real_photos",
    "real_photos",
    "resize_square",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# scikit-image samples that ship inside the wheel (others are fetched with pooch)
_SKIMAGE = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",  # the left view of stereo_motorcycle()
    "camera",
    "hubble_deep_field",
    "retina",
    "coins",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
)
# mvtb-data files that are photos (not calibration targets, synthetic patterns, mosaics)
_MVTB_SKIP = (
    "5points",
    "apriltag",
    "arucoboard",
    "multiblobs",
    "scale-space",
    "tags",
    "yellowtargets",
    "fisheye_target",
    "58060",
    "image18",
    "eg-morph",
    "segmentation",
    "shark",  # binary silhouettes (shark1, shark2, shark2a, sharks)
    "adelson",  # a rendered illusion
    "wheres-wally",  # a drawing
    "wally",
    "monalisa",  # a painting
    "lena",  # its subject asked for it to be retired from use
)


@dataclasses.dataclass(frozen=True)
class NamedImage:
    """An RGB uint8 image (H, W, 3) with where it came from."""

    name: str
    source: str
    image: np.ndarray


@dataclasses.dataclass(frozen=True)
class SkippedImage:
    """A photo (``name == "*"``: a whole source) that could not be loaded, and why."""

    name: str
    source: str
    reason: str


@dataclasses.dataclass(frozen=True)
class RealPhotos:
    """The photos that loaded and the ones skipped, with reasons."""

    images: list[NamedImage]
    skipped: list[SkippedImage]


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (
            (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            if image.max() <= 1.0
            else np.clip(image, 0, 255).astype(np.uint8)
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:  # grey, as a plane or with one channel
        image = np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return _rgb(np.asarray(img.convert("RGB")))


def _skimage_loader(data: Any, name: str) -> Callable[[], np.ndarray] | None:
    if name == "motorcycle_left":
        stereo = getattr(data, "stereo_motorcycle", None)
        return None if stereo is None else lambda: stereo()[0]
    return getattr(data, name, None)


def _skimage(skipped: list[SkippedImage]) -> list[NamedImage]:
    if importlib.util.find_spec("skimage") is None:
        skipped.append(SkippedImage("*", "scikit-image", "not installed: pip install scikit-image"))
        return []
    from skimage import data

    out = []
    for name in _SKIMAGE:
        loader = _skimage_loader(data, name)
        if loader is None:
            skipped.append(SkippedImage(name, "scikit-image", "not in this scikit-image version"))
            continue
        try:
            out.append(NamedImage(name, "scikit-image", _rgb(loader())))
        except (OSError, ValueError, ImportError) as error:
            # fetched with pooch on demand: not available offline; anything else is a bug
            skipped.append(SkippedImage(name, "scikit-image", f"{type(error).__name__}: {error}"))
    return out


def _sklearn(skipped: list[SkippedImage]) -> list[NamedImage]:
    if importlib.util.find_spec("sklearn") is None:
        skipped.append(SkippedImage("*", "scikit-learn", "not installed: pip install scikit-learn"))
        return []
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return [
        NamedImage(Path(f).stem, "scikit-learn", _rgb(img))
        for f, img in zip(bunch.filenames, bunch.images, strict=True)
    ]


def _matplotlib(skipped: list[SkippedImage]) -> list[NamedImage]:
    if importlib.util.find_spec("matplotlib") is None:
        skipped.append(SkippedImage("*", "matplotlib", "not installed: pip install matplotlib"))
        return []
    from matplotlib import cbook

    try:
        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except (OSError, ValueError) as error:
        skipped.append(
            SkippedImage("grace_hopper", "matplotlib", f"{type(error).__name__}: {error}")
        )
        return []
    return [NamedImage("grace_hopper", "matplotlib", _read(Path(path)))]


def _mvtb(skipped: list[SkippedImage]) -> list[NamedImage]:
    if importlib.util.find_spec("mvtbdata") is None:
        skipped.append(SkippedImage("*", "mvtb-data", "not installed: pip install mvtb-data"))
        return []
    folder = Path(str(files("mvtbdata") / "images"))
    out = []
    names: set[str] = set()
    for path in sorted(folder.iterdir()):
        stem = path.stem.lower()
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(stem.startswith(s) for s in _MVTB_SKIP):
            continue
        if stem in names:  # church.jpg and church.png: one photo, one name
            continue
        names.add(stem)
        image = _read(path)
        if min(image.shape[:2]) >= 64:
            out.append(NamedImage(path.stem, "mvtb-data", image))
    return out


# mvtb-data sub-folders of real photos (campus/holdout included: more distinct scenes)
_MVTB_FOLDERS = ("campus", "mosaic", "seq")
_MVTB_VIDEO = "traffic_sequence.mp4"
#: frames taken from the traffic video: one a second (30 fps); neighbours are near copies
VIDEO_FRAME_STEP = 30


def _mvtb_folders(skipped: list[SkippedImage]) -> list[NamedImage]:
    if importlib.util.find_spec("mvtbdata") is None:
        return []  # _mvtb already recorded the missing package
    root = Path(str(files("mvtbdata") / "images"))
    out = []
    for folder in _MVTB_FOLDERS:
        paths = sorted(p for p in (root / folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            skipped.append(SkippedImage("*", f"mvtb-data/{folder}", "folder not in this version"))
        out += [NamedImage(f"{folder}/{p.stem}", f"mvtb-data/{folder}", _read(p)) for p in paths]
    return out


def _mvtb_video(skipped: list[SkippedImage]) -> list[NamedImage]:
    """Every ``VIDEO_FRAME_STEP``-th frame of mvtb-data's traffic video (decoded with PyAV)."""
    if importlib.util.find_spec("mvtbdata") is None:
        return []
    source = f"mvtb-data/{_MVTB_VIDEO}"
    if importlib.util.find_spec("av") is None:
        skipped.append(SkippedImage("*", source, "PyAV not installed: pip install av"))
        return []
    import av

    path = Path(str(files("mvtbdata") / "images" / _MVTB_VIDEO))
    if not path.is_file():
        skipped.append(SkippedImage("*", source, "video not in this mvtb-data version"))
        return []
    out = []
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index % VIDEO_FRAME_STEP == 0:
                    out.append(
                        NamedImage(f"frame{index:04d}", source, frame.to_ndarray(format="rgb24"))
                    )
    except (av.FFmpegError, OSError) as error:  # a codec this PyAV build lacks
        skipped.append(SkippedImage("*", source, f"{type(error).__name__}: {error}"))
        return []
    return out


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` (bicubic), then crop the centre square."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    from PIL import Image

    height, width = image.shape[:2]
    scale = size / min(height, width)
    # max(size, ...): rounding must never leave the longer side short of the crop
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def load_real_photos(max_images: int | None = None, size: int | None = None) -> RealPhotos:
    """Real photos from every installed source, in a fixed order, sources interleaved.

    ``size`` resizes each photo's shorter side to ``size`` and crops the centre
    square; ``None`` keeps the original sizes. Sources or photos that cannot load
    offline are listed in ``skipped`` (and logged), never dropped silently.
    """
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0 or None, got {max_images}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be an int >= 1 or None, got {size!r}")
    skipped: list[SkippedImage] = []
    sources = [
        _skimage(skipped),
        _sklearn(skipped),
        _matplotlib(skipped),
        _mvtb(skipped),
        _mvtb_folders(skipped),
        _mvtb_video(skipped),
    ]
    out: list[NamedImage] = []
    for round_ in range(max((len(s) for s in sources), default=0)):
        out += [s[round_] for s in sources if round_ < len(s)]
    out = out if max_images is None else out[:max_images]
    if size is not None:
        out = [dataclasses.replace(p, image=resize_square(p.image, size)) for p in out]
    for item in skipped:
        log.info("real photos: skipped %s/%s (%s)", item.source, item.name, item.reason)
    return RealPhotos(out, skipped)


def real_photos(max_images: int | None = None, size: int | None = None) -> list[NamedImage]:
    """The photos of :func:`load_real_photos` (skip reasons go to the log)."""
    return load_real_photos(max_images, size).images


def load_image_files(root: str | Path, limit: int | None = None) -> list[NamedImage]:
    """Every image file under ``root`` (a file or a folder, searched recursively, sorted)."""
    root = Path(root).expanduser()
    if root.is_file():
        paths = [root]
    elif root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise FileNotFoundError(f"no image file or folder at {root}")
    paths = paths if limit is None else paths[:limit]
    return [NamedImage(p.stem, str(p.parent), _read(p)) for p in paths]
