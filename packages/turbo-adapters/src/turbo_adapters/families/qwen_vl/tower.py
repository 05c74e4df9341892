"""Qwen2-VL / Qwen2.5-VL tower stage: whole 2x2 units merged inside the vision tower.

Qwen's tower runs every image of a call packed into one sequence, split into attention
segments by ``cu_seqlens`` (per image) and, in Qwen2.5-VL, by ``cu_window_seqlens``
(windows of ``window_size`` pixels, edge windows smaller) with the rows permuted into
window order; every row carries its own rotary ``(cos, sin)`` row, and the PatchMerger
reads 4 consecutive rows (a 2x2 "unit", one language-model token) as one. This stage
runs the same blocks, but after each block of :attr:`QwenTowerReduction.layers` it
merges whole units:

- Each unit is described by the mean over its 4 rows of the block's attention keys
  (before rotary, heads averaged, as Turbo's tower takes ``k.mean(heads)``), or of the
  block's output (``similarity="hidden"``).
- Within each attention segment (a window in Qwen2.5-VL, an image in Qwen2-VL, so the
  window attention stays block-diagonal and no unit leaves its image), units are ranked
  by Turbo's information degree with ``alpha = 0`` (Qwen's tower has no CLS token to
  guide it): the redundancy ``R_i = max_{j != i} cos(d_i, d_j)`` over the segment's other
  units. The least redundant are kept (ties: the earlier unit in the segment), every
  other unit merges into its most similar kept unit of the segment (ties: the earlier
  kept unit): slot by slot, row ``i`` of the merged unit is the size-weighted mean of
  row ``i`` of its units, its size their sum. A kept unit keeps its own rotary rows
  (positions are never averaged).
- The next blocks get ``cu_window_seqlens`` / ``cu_seqlens`` rebuilt from the kept unit
  counts (x 4).

Counts are fixed in advance: image ``j`` keeps :func:`..connector.budget.connector_counts`
of its units (the connector's rule, count or fraction); its windows share them
deterministically (:func:`window_counts`: one per window, the rest in proportion to
``size - 1``, largest remainder, ties to the earlier window), and each window reaches
its count linearly over the scheduled layers (after step ``s`` of ``S``:
``n - (n - k) * (s + 1) // S``). No ``log(size)`` bias enters the tower's own attention
(its attention functions are the model's); the kept tokens' sizes go downstream like the
connector's (into the language model's attention where the family carries it).

The result per image: the PatchMerger output of its kept units in raster order, their
raster indices (``0 .. h*w/4 - 1``) and sizes, handed to the connector path
(:func:`..connector.calls.cut_call`), which cuts the ``<|image_pad|>`` runs; M-RoPE then
gets the kept positions (:mod:`.positions`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ...connector.budget import Budget, _check_budget, connector_counts
from ...connector.stage import KeptTokens
from ...patch import TurboPatch
from ..llava.modes import VisionLanguagePatch

__all__ = [
    "SIMILARITIES",
    "QwenTowerReduction",
    "QwenVLPatch",
    "install_tower",
    "reduced_tower",
    "tower_call",
    "tower_support",
    "window_counts",
]

#: what a unit is compared by: the block's attention keys, or its output hidden states
SIMILARITIES = ("keys", "hidden")


@dataclasses.dataclass(frozen=True)
class QwenTowerReduction:
    """Settings of Qwen's tower stage (``patch.tower``).

    Attributes:
        budget: tokens (2x2 units) kept per image after the tower: a count, a fraction or
            per-image counts, with the connector's rule (:func:`connector_counts`); None
            (the default) takes ``patch.connector.budget``.
        layers: the blocks after which units merge, strictly ascending, each in
            ``[0, depth - 1]``; the budget is reached after the last one. The default
            merges early, after blocks 0..3.
        similarity: ``"keys"`` (the block's attention keys, heads averaged) or
            ``"hidden"`` (the block's output).
        size_bias: ``log(size)`` of the merged tokens in the language model's attention,
            as :attr:`ConnectorReduction.size_bias` (None: where the family carries it).
    """

    budget: Budget | None = None
    layers: tuple[int, ...] = (0, 1, 2, 3)
    similarity: str = "keys"
    size_bias: bool | None = None

    def __post_init__(self) -> None:
        if self.budget is not None:
            object.__setattr__(self, "budget", _check_budget(self.budget))
        layers = self.layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        if (
            not isinstance(layers, Sequence)
            or isinstance(layers, str)
            or not layers
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in layers)
            or any(b <= a for a, b in itertools.pairwise(layers))
        ):
            raise ValueError(
                "layers must be a non-empty, strictly ascending sequence of block indices "
                f"in [0, depth - 1], got {self.layers!r}"
            )
        object.__setattr__(self, "layers", tuple(layers))
        if self.similarity not in SIMILARITIES:
            raise ValueError(
                f"similarity must be one of {', '.join(SIMILARITIES)}; got {self.similarity!r}"
            )
        if self.size_bias not in (None, True, False):
            raise ValueError(f"size_bias must be None, True or False, got {self.size_bias!r}")

    def check_depth(self, depth: int) -> None:
        """Raise unless every scheduled layer is a block of a ``depth``-block tower."""
        if self.layers[-1] >= depth:
            raise ValueError(
                f"layers must be in [0, {depth - 1}] (the tower has {depth} blocks), "
                f"got {self.layers!r}"
            )


class QwenVLPatch(VisionLanguagePatch):
    """The Qwen-VL patch: :class:`VisionLanguagePatch` with the tower stage's settings.

    Attributes:
        tower_depth: blocks of the vision tower (0 where the tower stage is refused).
    """

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        super().__init__(model, adapter_name)
        self.tower_depth = 0
        self._tower = QwenTowerReduction()

    @property
    def tower(self) -> QwenTowerReduction:
        """Tower-stage settings (budget, merge layers, similarity)."""
        return self._tower

    @tower.setter
    def tower(self, value: QwenTowerReduction) -> None:
        if not isinstance(value, QwenTowerReduction):
            raise TypeError(f"tower must be a QwenTowerReduction, got {type(value).__name__}")
        if self.tower_depth:
            value.check_depth(self.tower_depth)
        self._tower = value

    def check_modes(self, modes: frozenset[str]) -> frozenset[str]:
        modes = super().check_modes(modes)
        if {"tower", "connector"} <= modes:
            raise ValueError(
                "turbo mode: 'tower' and 'connector' cannot be combined on Qwen-VL (the tower "
                "stage already hands its kept tokens to the connector's cut); choose one"
            )
        return modes

    def tower_budget(self) -> Budget:
        """The tower stage's budget (its own, else the connector's)."""
        return self._tower.budget if self._tower.budget is not None else self._connector.budget


def window_counts(sizes: Sequence[int], kept: int) -> list[int]:
    """``kept`` units shared by windows of ``sizes`` units: one each, the rest in
    proportion to ``size - 1`` by largest remainder (ties to the earlier window).

    Raises:
        ValueError: ``kept`` below the number of windows (each keeps at least one unit).
    """
    total = sum(sizes)
    if kept >= total:
        return list(sizes)
    if kept < len(sizes):
        raise ValueError(
            f"the tower budget keeps {kept} tokens of an image whose tower has {len(sizes)} "
            f"attention windows (each keeps at least one token): use a budget >= {len(sizes)} "
            "for it, or the connector stage"
        )
    extra = kept - len(sizes)
    spare = [s - 1 for s in sizes]
    room = total - len(sizes)
    share = [extra * s // room for s in spare]
    remainder = [extra * s % room for s in spare]
    order = sorted(range(len(sizes)), key=lambda i: (-remainder[i], i))
    for i in order[: extra - sum(share)]:
        share[i] += 1
    return [1 + s for s in share]


def tower_support(visual: nn.Module) -> str | None:
    """Why the installed library's Qwen tower cannot run the tower stage, or None.

    The stage calls the tower's parts itself: ``patch_embed``, ``rotary_pos_emb(x,
    position_ids) -> (cos, sin)``, each block as ``block(x, cu_seqlens=...,
    position_embeddings=(cos, sin))`` with ``block.attn.qkv`` / ``num_heads``, and
    ``merger``; Qwen2.5-VL also ``window_size``, ``patch_size``, ``fullatt_block_indexes``.
    """
    needs = ["patch_embed", "rotary_pos_emb", "blocks", "merger", "spatial_merge_size"]
    if hasattr(visual, "fullatt_block_indexes"):
        needs += ["window_size", "patch_size"]
    missing = [name for name in needs if not hasattr(visual, name)]
    if missing:
        return f"{type(visual).__name__} has no {', '.join(missing)}"
    rotary = inspect.signature(visual.rotary_pos_emb.forward).parameters
    if "position_ids" not in rotary:
        return f"{type(visual.rotary_pos_emb).__name__}.forward takes no position_ids"
    block = visual.blocks[0]
    params = inspect.signature(block.forward).parameters
    if not {"cu_seqlens", "position_embeddings"} <= set(params):
        return f"{type(block).__name__}.forward takes no cu_seqlens / position_embeddings"
    attn = getattr(block, "attn", None)
    if not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        return f"{type(block).__name__}.attn has no fused qkv / num_heads"
    return None


#: the settings of the tower call being run (None: the tower runs as the model's)
_CALL: contextvars.ContextVar[tuple[nn.Module, QwenTowerReduction, Budget] | None] = (
    contextvars.ContextVar("turbo_qwen_tower", default=None)
)


@contextlib.contextmanager
def tower_call(visual: nn.Module, settings: QwenTowerReduction, budget: Budget) -> Iterator[None]:
    """Inside, the patched tower ``visual`` reduces (its forward returns a list of
    :class:`KeptTokens`); other towers run as they are."""
    token = _CALL.set((visual, settings, budget))
    try:
        yield
    finally:
        _CALL.reset(token)


def install_tower(patch: TurboPatch, visual: nn.Module) -> None:
    """Wrap ``visual.forward``: inside :func:`tower_call` it runs :func:`reduced_tower`."""

    def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = _CALL.get()
        if call is None or call[0] is not visual:
            return original(*args, **kwargs)
        hidden, grid = _pixels_and_grid(args, kwargs)
        return reduced_tower(visual, hidden, grid, call[1], call[2])

    patch.override(visual, "forward", forward)


def _pixels_and_grid(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    named = dict(kwargs)
    names = ("hidden_states", "grid_thw")
    for name, value in zip(names, args, strict=False):
        named[name] = value
    return named["hidden_states"], named["grid_thw"]


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _cumulative(lengths: Sequence[int], unit: int, device: torch.device) -> torch.Tensor:
    values = [0]
    for n in lengths:
        values.append(values[-1] + n * unit)
    return torch.tensor(values, dtype=torch.int32, device=device)


def reduced_tower(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    settings: QwenTowerReduction,
    budget: Budget,
) -> list[KeptTokens]:
    """Run Qwen2-VL's or Qwen2.5-VL's ``visual`` on a call's images, merging units.

    Returns per image its kept tokens (PatchMerger outputs, raster order), sizes (units
    each stands for) and raster indices. An image whose budget keeps all its units is
    exactly the unpatched tower's output for it.

    Raises:
        ValueError: an image of more than one temporal patch, scheduled layers beyond the
            tower's depth, or a budget below an image's window count.
    """
    merge = int(visual.spatial_merge_size)
    unit = merge * merge
    grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
    for g in grids:
        if g[0] != 1:
            raise ValueError(
                f"tower mode reduces images of one temporal patch (grid t = 1), got grid {g}"
            )
    blocks = list(visual.blocks)
    settings.check_depth(len(blocks))
    image_units = [h * w // unit for _, h, w in grids]
    counts = connector_counts(budget, image_units)
    windowed = hasattr(visual, "fullatt_block_indexes")
    device = pixel_values.device

    hidden = visual.patch_embed(pixel_values.type(visual.dtype))
    width = hidden.shape[-1]
    cos, sin = visual.rotary_pos_emb(hidden, _positions(grids, merge, device))
    if windowed:
        side = int(visual.window_size) // merge // int(visual.patch_size)
        order, segments = _windows(grids, merge, side, device)
        full_layers = set(visual.fullatt_block_indexes)
    else:
        order = torch.arange(sum(image_units), device=device)
        segments = list(image_units)
        full_layers = set(range(len(blocks)))
    # the image of every segment (segments never cross images, images in order)
    segment_image, filled, image = [], 0, 0
    for n in segments:
        while filled >= image_units[image]:
            filled, image = 0, image + 1
        segment_image.append(image)
        filled += n
    final = []
    for j, k in enumerate(counts):
        mine = [i for i, im in enumerate(segment_image) if im == j]
        final += window_counts([segments[i] for i in mine], k)
    rows = hidden.reshape(-1, unit, width)[order]
    cos = cos.reshape(-1, unit, cos.shape[-1])[order]
    sin = sin.reshape(-1, unit, sin.shape[-1])[order]
    units = order.clone()  # each unit's raster index over the call's images
    sizes = torch.ones(units.shape[0], dtype=torch.float32, device=device)
    initial = list(segments)
    schedule = {layer: step for step, layer in enumerate(settings.layers)}
    steps = len(settings.layers)

    captured: dict[str, torch.Tensor] = {}
    handles = []
    if settings.similarity == "keys":

        def grab(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            captured["qkv"] = output

        handles = [blocks[layer].attn.qkv.register_forward_hook(grab) for layer in schedule]
    try:
        for layer, block in enumerate(blocks):
            lengths = segments
            if layer in full_layers:
                lengths = [0] * len(image_units)
                for n, im in zip(segments, segment_image, strict=True):
                    lengths[im] += n
            cu = _cumulative(lengths, unit, device)
            flat = block(
                rows.reshape(-1, width),
                cu_seqlens=cu,
                max_seqlen=max(lengths) * unit,
                position_embeddings=(
                    cos.reshape(-1, cos.shape[-1]),
                    sin.reshape(-1, sin.shape[-1]),
                ),
            )
            rows = flat.reshape(-1, unit, width)
            if layer not in schedule:
                continue
            step = schedule[layer]
            targets = [
                n - (n - k) * (step + 1) // steps for n, k in zip(initial, final, strict=True)
            ]
            if targets == segments:
                continue
            if settings.similarity == "keys":
                qkv = captured.pop("qkv")
                heads = int(block.attn.num_heads)
                keys = qkv[:, width : 2 * width].reshape(-1, heads, width // heads).mean(1)
                describe = keys.reshape(-1, unit, keys.shape[-1]).mean(1)
            else:
                describe = rows.mean(1)
            # image by image (windows never cross images): similarities stay per image
            keeps, destinations, at = [], [], 0
            for j in range(len(image_units)):
                mine = [i for i, im in enumerate(segment_image) if im == j]
                count = sum(segments[i] for i in mine)
                keep, destination = _choose(
                    describe[at : at + count],
                    [segments[i] for i in mine],
                    [targets[i] for i in mine],
                )
                keeps.append(keep)
                destinations.append(destination + at)
                at += count
            keep, destination = torch.cat(keeps), torch.cat(destinations)
            rows, sizes = _merge(rows, sizes, keep, destination)
            cos, sin, units = cos[keep], sin[keep], units[keep]
            segments = targets
    finally:
        for handle in handles:
            handle.remove()
    merged = visual.merger(rows.reshape(-1, width))  # one token per unit
    out = []
    start = 0
    for n in image_units:
        mine = ((units >= start) & (units < start + n)).nonzero().squeeze(-1)
        index, arrange = (units[mine] - start).sort()
        chosen = mine[arrange]
        out.append(KeptTokens(merged[chosen], sizes[chosen], index))
        start += n
    return out


def _positions(grids: Sequence[tuple[int, ...]], merge: int, device: torch.device) -> torch.Tensor:
    """``(rows, 2)`` every patch row's ``(h, w)``, the rows of each ``merge x merge`` unit
    consecutive, units in raster order (the tower's rotary positions)."""
    out = []
    for _, h, w in grids:
        shape = (h // merge, merge, w // merge, merge)
        hh = torch.arange(h, device=device).view(h // merge, merge, 1, 1).expand(shape)
        ww = torch.arange(w, device=device).view(1, 1, w // merge, merge).expand(shape)
        out.append(
            torch.stack(
                [hh.permute(0, 2, 1, 3).reshape(-1), ww.permute(0, 2, 1, 3).reshape(-1)], -1
            )
        )
    return torch.cat(out)


def _windows(
    grids: Sequence[tuple[int, ...]], merge: int, side: int, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's window partition: the units (call-wide raster indices) in window order
    and each window's unit count. Windows of ``side x side`` units tile each image from
    its top-left corner, in raster order (the edge windows at the bottom and right are
    smaller); units within a window in raster order."""
    order: list[int] = []
    lengths: list[int] = []
    offset = 0
    for _, h, w in grids:
        rows, cols = h // merge, w // merge
        for top in range(0, rows, side):
            for left in range(0, cols, side):
                window = [
                    offset + y * cols + x
                    for y in range(top, min(top + side, rows))
                    for x in range(left, min(left + side, cols))
                ]
                order += window
                lengths.append(len(window))
        offset += rows * cols
    return torch.tensor(order, dtype=torch.long, device=device), lengths


def _choose(
    describe: torch.Tensor, segments: Sequence[int], targets: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The units kept (a bool mask) and every unit's destination (a unit's own position
    when kept): ``targets[s]`` least redundant units of segment ``s`` kept, the others to
    their most similar kept unit of the segment."""
    device = describe.device
    count = describe.shape[0]
    segment = torch.repeat_interleave(
        torch.arange(len(segments), device=device), torch.tensor(segments, device=device)
    )
    starts = torch.tensor([0, *segments], device=device).cumsum(0)[:-1]
    x = _work(describe)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = x @ x.T
    same = segment[:, None] == segment[None, :]
    others = similarity.masked_fill(~same, -math.inf)
    others.fill_diagonal_(-math.inf)
    redundancy = others.max(dim=-1).values
    ranked = redundancy.argsort(stable=True)
    ranked = ranked[segment[ranked].argsort(stable=True)]  # by segment, then by R
    rank = torch.empty_like(ranked)
    rank[ranked] = torch.arange(count, device=device) - starts[segment[ranked]]
    keep = rank < torch.tensor(targets, device=device)[segment]
    to_kept = similarity.masked_fill(~(same & keep[None, :]), -math.inf)
    destination = to_kept.argmax(dim=-1)
    positions = torch.arange(count, device=device)
    destination = torch.where(keep, positions, destination)
    return keep, destination


def _merge(
    rows: torch.Tensor, sizes: torch.Tensor, keep: torch.Tensor, destination: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Units merged slot by slot into their destinations (size-weighted means)."""
    slot = keep.long().cumsum(0) - 1  # a kept unit's new position
    target = slot[destination]
    kept = int(keep.sum())
    work = _work(rows)
    weight = sizes.to(work.dtype)
    sums = work.new_zeros(kept, *rows.shape[1:]).index_add_(0, target, work * weight[:, None, None])
    total = weight.new_zeros(kept).index_add_(0, target, weight)
    merged = (sums / total[:, None, None]).to(rows.dtype)
    return merged, total.to(sizes.dtype)
