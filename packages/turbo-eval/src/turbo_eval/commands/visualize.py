"""Which patches merged with which, block by block (the paper's Figure 6).

The model is patched twice in turn, Turbo (redundancy and semantics) and redundancy only
(ToMe), with source tracing on. ``last_state.source`` tells where every original token
ended up after the LAST block, so the map after block ``d`` comes from a run whose
per-block schedule is ``[r] * d`` followed by zeros: the first ``d`` blocks merge exactly as
in the full run (nothing downstream influences them) and the rest leave the tokens alone.

Each group of merged patches is painted with the mean colour of the image inside it and
outlined, as in ToMe's visualisation. Prefix tokens (CLS, registers) are protected, stand
only for themselves and are not drawn.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import LoadedModel, load_model
from .analyze import load_images, patch_grid

__all__ = [
    "CELL_INCHES",
    "DPI",
    "MergeMap",
    "default_depths",
    "display_image",
    "group_boundaries",
    "group_mean_colors",
    "merge_groups",
    "merge_maps",
    "merges_path",
    "visualize_merges",
]

CELL_INCHES = 3.0  # each panel is CELL_INCHES x CELL_INCHES
DPI = 100
_TITLE_INCHES = 0.5  # room for the figure title above the grid


# ------------------------------------------------------------------------ groups
def merge_groups(
    source: torch.Tensor | None, grid: tuple[int, int], prefix: int = 1
) -> torch.Tensor:
    """Group id of every patch: ``(grid_h, grid_w)`` int64, ids ``0 .. G-1``.

    Args:
        source: ``(N_orig,)`` or ``(1, N_orig)``: the slot each original token (prefix
            tokens first, then patches in row-major order) now occupies; patches sharing
            a slot were merged together. ``None`` means nothing merged.
        grid: ``(grid_h, grid_w)`` patches.
        prefix: leading non-patch tokens in ``source`` (CLS, registers).

    Ids are numbered in the order groups first appear in row-major order, so the same
    partition always gets the same ids.
    """
    grid_h, grid_w = grid
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    if prefix < 0:
        raise ValueError(f"prefix must be >= 0, got {prefix}")
    patches = grid_h * grid_w
    if source is None:
        return torch.arange(patches).view(grid_h, grid_w)
    if source.dim() == 2:
        if source.shape[0] != 1:
            raise ValueError(f"source must hold one image, got shape {tuple(source.shape)}")
        source = source[0]
    if source.dim() != 1 or source.shape[0] != prefix + patches:
        raise ValueError(
            f"source must have {prefix} prefix + {grid_h}x{grid_w} patch entries, "
            f"got shape {tuple(source.shape)}"
        )
    slots = source[prefix:].long().cpu()
    _, inverse = torch.unique(slots, return_inverse=True)
    # renumber by first appearance so ids do not depend on slot order
    first = torch.full((int(inverse.max()) + 1,), patches, dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(patches), reduce="amin")
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(first.numel())
    return rank[inverse].view(grid_h, grid_w)


def group_mean_colors(image: np.ndarray, groups: torch.Tensor, patch: int) -> np.ndarray:
    """``image`` (H, W, 3) with every group of patches painted its mean colour."""
    grid_h, grid_w = groups.shape
    height, width = grid_h * patch, grid_w * patch
    if image.shape[0] < height or image.shape[1] < width:
        raise ValueError(f"image {image.shape[:2]} is smaller than the patch grid {height, width}")
    crop = image[:height, :width].astype(np.float64)
    # patches are equally large, so the group mean is the mean of its patch means
    patch_means = crop.reshape(grid_h, patch, grid_w, patch, -1).mean(axis=(1, 3))
    flat = groups.reshape(-1).numpy()
    count = np.bincount(flat)
    means = patch_means.reshape(flat.size, -1)
    sums = np.stack([np.bincount(flat, weights=means[:, c]) for c in range(means.shape[1])], 1)
    colors = (sums / count[:, None])[flat].reshape(grid_h, grid_w, -1)
    return np.repeat(np.repeat(colors, patch, axis=0), patch, axis=1)


def group_boundaries(groups: torch.Tensor, patch: int) -> np.ndarray:
    """``(grid_h * patch, grid_w * patch)`` bool: pixels on the border between two groups."""
    ids = np.repeat(np.repeat(groups.numpy(), patch, axis=0), patch, axis=1)
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    return edge


# ------------------------------------------------------------------------ images
def display_image(loaded: LoadedModel, pixels: torch.Tensor) -> np.ndarray:
    """The prepared input ``pixels`` (1, 3, H, W) back in ``[0, 1]`` RGB, (H, W, 3).

    ``prepare`` ends with a per-channel affine normalisation; feeding it a black and a
    white image reveals that map exactly, whatever mean/std the model uses.
    """
    black = loaded.prepare([np.zeros((32, 32, 3), dtype=np.uint8)])[0, :, 0, 0].float()
    white = loaded.prepare([np.full((32, 32, 3), 255, dtype=np.uint8)])[0, :, 0, 0].float()
    scale = (white - black).view(3, 1, 1)
    rgb = (pixels[0].detach().float().cpu() - black.view(3, 1, 1)) / scale
    return rgb.clamp(0, 1).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------ merging
@dataclasses.dataclass(frozen=True)
class MergeMap:
    """The patch groups after ``depth`` blocks and the sequence length there."""

    depth: int
    groups: torch.Tensor  # (grid_h, grid_w) int64
    tokens: int


def default_depths(num_blocks: int) -> list[int]:
    """After a quarter, half, three quarters and all of the blocks (3, 6, 9, 12 of 12)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return sorted({max(1, round(num_blocks * k / 4)) for k in range(1, 5)})


def merge_maps(
    loaded: LoadedModel,
    pixels: torch.Tensor,
    r: int,
    depths: Sequence[int] | None = None,
    **overrides: Any,
) -> list[MergeMap]:
    """Patch groups after each of ``depths`` blocks for one prepared image.

    Patches ``loaded.module`` with ``turbo_adapters.apply(r=..., trace_source=True,
    **overrides)`` and removes the patch again before returning.
    """
    import turbo_adapters

    if pixels.dim() != 4 or pixels.shape[0] != 1:
        raise ValueError(
            f"pixels must be one prepared image (1, C, H, W), got {tuple(pixels.shape)}"
        )
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if loaded.handle is not None or turbo_adapters.handle_of(loaded.module) is not None:
        raise ValueError("visualize patches the model itself; pass an unpatched model")
    grid_h, grid_w, _ = patch_grid(loaded.module, pixels)
    handle = turbo_adapters.apply(loaded.module, r=0, trace_source=True, **overrides)
    try:
        blocks = handle.num_blocks
        chosen = default_depths(blocks) if depths is None else sorted(set(depths))
        if not chosen or chosen[0] < 1 or chosen[-1] > blocks:
            raise ValueError(f"depths must be within 1..{blocks}, got {list(depths or [])}")
        patches = grid_h * grid_w
        maps = []
        for depth in chosen:
            handle.r = [r] * depth + [0] * (blocks - depth)
            with torch.inference_mode():
                loaded.forward_features(loaded.module, pixels, handle)
            state = handle.last_state
            assert state is not None
            source = state.source
            # prefix tokens: whatever precedes the patches in the original sequence
            prefix = 1 if source is None else source.shape[-1] - patches
            groups = merge_groups(source, (grid_h, grid_w), prefix)
            tokens = state.token_counts[depth - 1] if state.token_counts else prefix + patches
            maps.append(MergeMap(depth, groups, int(tokens)))
        return maps
    finally:
        handle.remove()


# ------------------------------------------------------------------------ figure
def merges_path(out: str | Path, image: str | Path) -> Path:
    """Where ``visualize`` writes: ``out`` if it names a .png, else ``out/IMAGE-merges.png``.

    A path that is an existing folder, ends in a separator or has no suffix is a folder.
    """
    text = str(out)
    path = Path(text)
    if path.is_dir() or text.endswith(("/", "\\")) or not path.suffix:
        return path / f"{Path(image).stem}-merges.png"
    if path.suffix.lower() != ".png":
        raise ValueError(f"out must be a .png file or a folder, got {text!r}")
    return path


def visualize_merges(
    model: str,
    image: str,
    out: str,
    r: int = 16,
    alpha: float = 5.0,
    semantic_scale: float = 30.0,
    resolution: int | None = None,
    loaded: LoadedModel | None = None,
    depths: Sequence[int] | None = None,
) -> Path:
    """Draw Turbo's merges (top row) against redundancy-only merges (bottom row).

    Args:
        model: a name :func:`turbo_eval.models.load_model` knows (only the title when
            ``loaded`` is given).
        image: one image file.
        out: the PNG to write, or a folder (an existing one, or a path without a
            suffix) to write ``IMAGE-merges.png`` into; folders are created.
        r: tokens merged per block.
        alpha, semantic_scale: Turbo's semantic weight (``alpha * semantic_scale``).
        resolution: input size passed to the loader.
        loaded: an already loaded, unpatched model to use instead of loading ``model``.
        depths: blocks after which to draw (default: 1/4, 1/2, 3/4 and all of them).

    Returns:
        The PNG path. The figure is ``(1 + len(depths)) * CELL_INCHES`` wide and
        ``2 * CELL_INCHES + 0.5`` high, at :data:`DPI`.
    """
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    picture = load_images([image])
    if len(picture) != 1:
        raise ValueError(f"image must be one image file, got {len(picture)} images")
    if loaded is None:
        loaded = load_model(model, resolution)
    if loaded.modality != "image":
        raise ValueError(f"model {model!r} is a {loaded.modality} model; visualize needs images")
    pixels = loaded.prepare(picture)
    _, _, patch = patch_grid(loaded.module, pixels)
    rows = {
        f"Turbo (alpha={alpha:g} x {semantic_scale:g})": merge_maps(
            loaded, pixels, r, depths, mode="turbo", alpha=alpha, semantic_scale=semantic_scale
        ),
        "redundancy only (ToMe)": merge_maps(loaded, pixels, r, depths, mode="redundancy"),
    }
    path = merges_path(out, image)
    path.parent.mkdir(parents=True, exist_ok=True)
    _draw(display_image(loaded, pixels), patch, rows, path, f"{model}, r={r} per block")
    return path


def _draw(
    rgb: np.ndarray, patch: int, rows: dict[str, list[MergeMap]], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + max(len(maps) for maps in rows.values())
    fig, axes = plt.subplots(
        len(rows),
        columns,
        figsize=(columns * CELL_INCHES, len(rows) * CELL_INCHES + _TITLE_INCHES),
        dpi=DPI,
        squeeze=False,
    )
    try:
        for axes_row, (label, maps) in zip(axes, rows.items(), strict=True):
            axes_row[0].imshow(rgb)
            axes_row[0].set_title("input", fontsize=9)
            axes_row[0].set_ylabel(label, fontsize=9)
            for axis, merge_map in zip(axes_row[1:], maps, strict=False):
                painted = group_mean_colors(rgb, merge_map.groups, patch)
                painted[group_boundaries(merge_map.groups, patch)] = 1.0  # white outlines
                axis.imshow(painted.clip(0, 1), interpolation="nearest")
                axis.set_title(
                    f"after block {merge_map.depth}: {merge_map.tokens} tokens", fontsize=9
                )
            for axis in axes_row:
                axis.set_xticks([])
                axis.set_yticks([])
        fig.suptitle(title, fontsize=10)
        fig.subplots_adjust(
            left=0.04,
            right=0.99,
            bottom=0.01,
            wspace=0.05,
            hspace=0.12,
            top=1 - _TITLE_INCHES / (len(rows) * CELL_INCHES + _TITLE_INCHES),
        )
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``turbo-eval visualize``: the output is checked before the model loads."""
    try:
        merges_path(args.out, args.image)
    except ValueError as error:
        parser.error(f"argument --out: {error}")
    if not Path(args.image).is_file():
        parser.error(f"argument image: no image file at {args.image!r}")
    path = visualize_merges(
        args.model,
        args.image,
        out=args.out,
        r=args.r,
        alpha=args.alpha,
        semantic_scale=args.semantic_scale,
        resolution=args.resolution,
    )
    print(f"     png: {path}")
    return 0
