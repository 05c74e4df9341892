"""turbo-eval analyze and visualize, end to end on tiny random-init ViTs and real photos."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")
Image = pytest.importorskip("PIL.Image")

import turbo_adapters  # noqa: E402
from turbo_eval.cli import main  # noqa: E402
from turbo_eval.commands.analyze import (  # noqa: E402
    BlockProbe,
    analyze_model,
    capture_blocks,
    find_attention_blocks,
    informativity_rows,
    load_images,
)
from turbo_eval.commands.visualize import (  # noqa: E402
    CELL_INCHES,
    DPI,
    default_depths,
    display_image,
    group_boundaries,
    group_mean_colors,
    merge_groups,
    merge_maps,
    visualize_merges,
)
from turbo_eval.models import LoadedModel  # noqa: E402

RES = 64
PATCH = 8
DEPTH = 4
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# ------------------------------------------------------------------ fixtures
def _prepare(images: Sequence[Any]) -> torch.Tensor:
    """Square resize + per-channel normalisation, written independently of turbo_eval."""
    batch = []
    for image in images:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        pil = pil.convert("RGB").resize((RES, RES), Image.BILINEAR)
        batch.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0))
    x = torch.stack(batch).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _tiny_timm(**kwargs: Any) -> LoadedModel:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=RES,
        patch_size=PATCH,
        embed_dim=48,
        depth=DEPTH,
        num_heads=3,
        mlp_ratio=2.0,
        num_classes=0,
        **kwargs,
    ).eval()

    def features(m, pixels, handle):
        return m.forward_head(m.forward_features(pixels), pre_logits=True)

    return LoadedModel("tiny-timm", model, "image", _prepare, features)


def _dinov2_config(**kwargs: Any):
    return transformers.Dinov2Config(
        hidden_size=48,
        num_hidden_layers=DEPTH,
        num_attention_heads=3,
        mlp_ratio=2,
        patch_size=PATCH,
        image_size=RES,
        **kwargs,
    )


def _tiny_dinov2(attn: str | None = None) -> LoadedModel:
    torch.manual_seed(0)
    config = _dinov2_config()
    if attn is not None:
        config._attn_implementation = attn
    model = transformers.Dinov2Model(config).eval()

    def features(m, pixels, handle):
        return m(pixel_values=pixels).pooler_output

    return LoadedModel("tiny-dinov2", model, "image", _prepare, features)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage_data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skimage_data.chelsea()).save(folder / "chelsea.jpg")
    (folder / "notes.txt").write_text("not an image")
    return {
        "folder": folder,
        "astronaut": folder / "astronaut.png",
        "chelsea": folder / "chelsea.jpg",
    }


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------ analyze
def test_load_images_folders_sorted_and_errors(photos, tmp_path):
    images = load_images([str(photos["folder"]), str(photos["astronaut"])])
    assert len(images) == 3  # astronaut, chelsea (folder, sorted), astronaut again
    assert images[0].size == (512, 512) and images[1].size == (451, 300)
    assert all(image.mode == "RGB" for image in images)
    with pytest.raises(FileNotFoundError, match="images"):
        load_images([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=r"no \.jpg"):
        load_images([str(tmp_path)])


@pytest.mark.parametrize("make", [_tiny_timm, _tiny_dinov2], ids=["timm", "dinov2"])
def test_analyze_end_to_end(make, photos, tmp_path):
    loaded = make()
    paths = analyze_model("tiny", [str(photos["folder"])], out=str(tmp_path / "out"), loaded=loaded)
    assert set(paths) == {"csv", "markdown", "png"}
    assert all(path.is_file() for path in paths.values())
    rows = _read_csv(paths["csv"])
    assert [int(row["block"]) for row in rows] == list(range(1, DEPTH + 1))
    patches = (RES // PATCH) ** 2
    for row in rows:
        assert int(row["tokens"]) == patches + 1
        assert -1.0 <= float(row["redundancy"]) <= 1.0
        # the top 10% of a distribution over 64 patches hold at least 7/64 of it
        assert 7 / patches - 1e-6 <= float(row["concentration"]) <= 1.0 + 1e-6
        assert 0.0 <= float(row["entropy"]) <= 1.0 + 1e-6
        assert 0.0 <= float(row["cls_prefix_share"]) <= 1.0
    table = paths["markdown"].read_text(encoding="utf-8")
    assert table.count("\n| ") == DEPTH + 1  # header + one line per block
    with Image.open(paths["png"]) as png:
        assert png.size == (1000, 400)


def test_rows_are_the_mean_over_images_whatever_the_batch(photos):
    loaded = _tiny_timm()
    images = load_images([str(photos["folder"])])
    together = informativity_rows(loaded, images, batch_size=2)
    apart = [informativity_rows(loaded, [image]) for image in images]
    for block, row in enumerate(together):
        for key in ("redundancy", "concentration", "entropy", "cls_prefix_share"):
            expected = (apart[0][block][key] + apart[1][block][key]) / 2
            assert row[key] == pytest.approx(expected, abs=1e-5)
    # different images must give different figures, or the average test means nothing
    assert apart[0][0]["redundancy"] != pytest.approx(apart[1][0]["redundancy"], abs=1e-4)


def test_hook_cls_row_equals_eager_attention_row_transformers(photos):
    """Oracle: transformers' own eager attention matrices (output_attentions=True)."""
    loaded = _tiny_dinov2(attn="eager")
    pixels = loaded.prepare(load_images([str(photos["folder"])]))
    with BlockProbe(loaded.module) as probe, torch.inference_mode():
        out = loaded.module(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        capture = probe.capture
    assert len(out.attentions) == DEPTH
    for index, attention in enumerate(out.attentions):
        torch.testing.assert_close(
            capture.cls_rows[index], attention[:, :, 0].float(), atol=1e-6, rtol=1e-5
        )
    # the recorded hidden states are the layers' outputs (the last ones before layernorm)
    for index, hidden in enumerate(out.hidden_states[-DEPTH:]):
        torch.testing.assert_close(capture.hidden[index], hidden)


def test_hook_cls_row_equals_timm_unfused_attention():
    """Oracle: timm's explicit softmax attention, read at the dropout that follows it."""
    loaded = _tiny_timm(qk_norm=True)  # q/k norms must enter the hooked computation
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for index, block in enumerate(loaded.module.blocks):
        block.attn.fused_attn = False

        def grab(module, args, output, index=index):
            seen[index] = args[0].detach()

        handles.append(block.attn.attn_drop.register_forward_hook(grab))
    pixels = torch.randn(2, 3, RES, RES)
    try:
        capture = capture_blocks(loaded, pixels)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(seen) == list(range(DEPTH))
    for index in range(DEPTH):
        torch.testing.assert_close(
            capture.cls_rows[index], seen[index][:, :, 0], atol=1e-6, rtol=1e-5
        )


def test_analyze_refuses_patched_and_unknown_models(photos):
    loaded = _tiny_timm()
    handle = turbo_adapters.apply(loaded.module, r=2)
    try:
        with pytest.raises(ValueError, match="unpatched"):
            informativity_rows(loaded, load_images([str(photos["astronaut"])]))
    finally:
        handle.remove()
    with pytest.raises(TypeError, match="attention blocks"):
        find_attention_blocks(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_cli_analyze_with_a_timm_name(photos, tmp_path):
    out = tmp_path / "cli"
    code = main(
        [
            "analyze",
            "vit_tiny_patch16_224",
            str(photos["chelsea"]),
            "--resolution",
            "96",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = _read_csv(out / "informativity.csv")
    assert len(rows) == 12 and int(rows[0]["tokens"]) == (96 // 16) ** 2 + 1


# ------------------------------------------------------------------ merge groups
def test_merge_groups_by_hand():
    # prefix CLS at slot 0; patches 0 and 2 share slot 1 with patch 3; patch 1 is alone
    source = torch.tensor([0, 1, 2, 1, 1])
    groups = merge_groups(source, (2, 2), prefix=1)
    assert groups.tolist() == [[0, 1], [0, 0]]
    assert merge_groups(None, (2, 3)).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="prefix"):
        merge_groups(source, (2, 2), prefix=2)
    with pytest.raises(ValueError, match="one image"):
        merge_groups(source.expand(2, -1), (2, 2), prefix=1)


@pytest.mark.parametrize(
    "make", [lambda: _tiny_timm(reg_tokens=2), _tiny_dinov2], ids=["timm-registers", "dinov2"]
)
def test_merge_groups_partition_the_patches_like_the_sources(make, photos):
    loaded = make()
    pixels = loaded.prepare(load_images([str(photos["astronaut"])]))
    grid = (RES // PATCH, RES // PATCH)
    patches = grid[0] * grid[1]
    maps = merge_maps(
        loaded, pixels, r=6, depths=[1, DEPTH], mode="turbo", alpha=5.0, semantic_scale=30.0
    )
    assert turbo_adapters.handle_of(loaded.module) is None  # the patch is removed again
    # the oracle: the raw source map of the same runs, read from the handle directly
    handle = turbo_adapters.apply(
        loaded.module, r=0, trace_source=True, mode="turbo", alpha=5.0, semantic_scale=30.0
    )
    try:
        for merge_map in maps:
            handle.r = [6] * merge_map.depth
            with torch.inference_mode():
                loaded.forward_features(loaded.module, pixels, handle)
            state = handle.last_state
            source = state.source[0]
            prefix = source.numel() - patches
            assert prefix == handle.config.protected  # CLS (+ registers)
            # prefix tokens stay in their own slots, never shared with a patch
            assert set(source[:prefix].tolist()).isdisjoint(source[prefix:].tolist())
            groups = merge_groups(state.source, grid, prefix).flatten()
            slots = source[prefix:]
            same_slot = slots[:, None] == slots[None, :]
            same_group = groups[:, None] == groups[None, :]
            assert torch.equal(same_slot, same_group)  # the same partition
            assert sorted(set(groups.tolist())) == list(range(int(groups.max()) + 1))
            assert int(groups.max()) + 1 == state.token_counts[-1] - prefix
            assert merge_map.tokens == state.token_counts[-1]
            assert torch.equal(merge_map.groups.flatten(), groups)
    finally:
        handle.remove()
    assert maps[0].tokens == patches + prefix - 6
    assert maps[1].tokens == patches + prefix - 6 * DEPTH


def test_group_colors_and_boundaries():
    rng = np.random.default_rng(0)
    image = rng.random((4 * PATCH, 4 * PATCH, 3))
    one = torch.zeros(4, 4, dtype=torch.long)
    painted = group_mean_colors(image, one, PATCH)
    np.testing.assert_allclose(painted, np.broadcast_to(image.mean(axis=(0, 1)), image.shape))
    alone = torch.arange(16).view(4, 4)
    painted = group_mean_colors(image, alone, PATCH)
    np.testing.assert_allclose(
        painted[:PATCH, PATCH : 2 * PATCH],
        np.broadcast_to(image[:PATCH, PATCH : 2 * PATCH].mean(axis=(0, 1)), (PATCH, PATCH, 3)),
    )
    halves = torch.tensor([[0, 0, 1, 1]] * 4)
    edge = group_boundaries(halves, PATCH)
    assert edge.shape == (4 * PATCH, 4 * PATCH)
    assert edge[:, 2 * PATCH].all() and edge.sum() == 4 * PATCH
    assert not group_boundaries(one, PATCH).any()


def test_display_image_undoes_prepare(photos):
    loaded = _tiny_timm()
    picture = load_images([str(photos["chelsea"])])
    rgb = display_image(loaded, loaded.prepare(picture))
    expected = np.asarray(picture[0].resize((RES, RES), Image.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(rgb, expected, atol=1e-5)


# ------------------------------------------------------------------ visualize
@pytest.mark.parametrize("make", [_tiny_timm, _tiny_dinov2], ids=["timm", "dinov2"])
def test_visualize_end_to_end(make, photos, tmp_path):
    loaded = make()
    path = visualize_merges(
        "tiny",
        str(photos["astronaut"]),
        out=str(tmp_path / "a" / "m.png"),
        r=6,
        alpha=5.0,
        semantic_scale=30.0,
        resolution=None,
        loaded=loaded,
    )
    assert path.is_file()
    columns = 1 + len(default_depths(DEPTH))
    with Image.open(path) as png:
        assert png.size == (
            round(columns * CELL_INCHES * DPI),
            round((2 * CELL_INCHES + 0.5) * DPI),
        )
        pixels = np.asarray(png.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10  # something was drawn
    assert turbo_adapters.handle_of(loaded.module) is None


def test_cli_visualize_with_a_timm_name(photos, tmp_path):
    out = tmp_path / "merges.png"
    code = main(
        [
            "visualize",
            "vit_tiny_patch16_224",
            str(photos["chelsea"]),
            "--r",
            "4",
            "--resolution",
            "96",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    with Image.open(out) as png:
        assert png.size == (round(5 * CELL_INCHES * DPI), round((2 * CELL_INCHES + 0.5) * DPI))


def test_default_depths_and_bad_input(photos):
    assert default_depths(12) == [3, 6, 9, 12]
    assert default_depths(2) == [1, 2]
    loaded = _tiny_timm()
    pixels = loaded.prepare(load_images([str(photos["astronaut"])]))
    with pytest.raises(ValueError, match="depths"):
        merge_maps(loaded, pixels, r=2, depths=[DEPTH + 1])
    assert turbo_adapters.handle_of(loaded.module) is None
    with pytest.raises(ValueError, match="r must be"):
        merge_maps(loaded, pixels, r=-1)
