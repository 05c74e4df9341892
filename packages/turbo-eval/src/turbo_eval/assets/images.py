"""Real photos that install with packages: scikit-image, scikit-learn, matplotlib, mvtb-data."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "NamedImage", "load_image_files", "real_photos"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# scikit-image samples that ship inside the wheel (others are fetched with pooch)
_SKIMAGE = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "camera",
    "horse",
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
)


@dataclasses.dataclass(frozen=True)
class NamedImage:
    """An RGB uint8 image (H, W, 3) with where it came from."""

    name: str
    source: str
    image: np.ndarray


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


def _skimage() -> list[NamedImage]:
    if importlib.util.find_spec("skimage") is None:
        return []
    from skimage import data

    out = []
    for name in _SKIMAGE:
        loader: Callable[[], np.ndarray] | None = getattr(data, name, None)
        if loader is None:
            continue
        try:
            out.append(NamedImage(name, "scikit-image", _rgb(loader())))
        except (OSError, ValueError, ImportError, ModuleNotFoundError):
            continue  # fetched with pooch on demand: not available offline
    return out


def _sklearn() -> list[NamedImage]:
    if importlib.util.find_spec("sklearn") is None:
        return []
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return [
        NamedImage(Path(f).stem, "scikit-learn", _rgb(img))
        for f, img in zip(bunch.filenames, bunch.images, strict=True)
    ]


def _matplotlib() -> list[NamedImage]:
    if importlib.util.find_spec("matplotlib") is None:
        return []
    from matplotlib import cbook

    try:
        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except (OSError, ValueError):
        return []
    return [NamedImage("grace_hopper", "matplotlib", _read(Path(path)))]


def _mvtb() -> list[NamedImage]:
    if importlib.util.find_spec("mvtbdata") is None:
        return []
    folder = Path(str(files("mvtbdata") / "images"))
    out = []
    for path in sorted(folder.iterdir()):
        stem = path.stem.lower()
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(stem.startswith(s) for s in _MVTB_SKIP):
            continue
        image = _read(path)
        if min(image.shape[:2]) >= 64:
            out.append(NamedImage(path.stem, "mvtb-data", image))
    return out


def real_photos(max_images: int | None = None) -> list[NamedImage]:
    """Real photos from every installed source, in a fixed order, sources interleaved."""
    sources = [_skimage(), _sklearn(), _matplotlib(), _mvtb()]
    out: list[NamedImage] = []
    for round_ in range(max((len(s) for s in sources), default=0)):
        out += [s[round_] for s in sources if round_ < len(s)]
    return out if max_images is None else out[:max_images]


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
