"""Peer methods of the diffusion families, written here from their papers: ToDo and ToMA.

- **ToDo** (Smith et al. 2024, "Token Downsampling for Efficient Generation of
  High-Resolution Images"): self-attention keeps every query and attends to keys and
  values taken from a grid downsampled by ``factor`` in each direction (nearest
  neighbour, the paper's default; or the window average). Nothing to restore.
- **ToMA** (Lu et al., ICML 2025, "Token Merge with Attention for Diffusion Models"):
  destinations are chosen by greedy maximisation of the submodular facility-location
  function ``F(S) = sum_i max_{j in S} sim(i, j)`` over the tokens' cosine similarity;
  every token spreads itself over the destinations with attention weights
  ``A = softmax_d(sim(x_i, x_d) / tau)``; a merged token is the ``A``-weighted mean of
  the tokens, and un-merging gives each token ``sum_d A[i, d] y_d``. Merge and un-merge
  are dense matrix products (what makes it fast with fused attention). The selection is
  local, as in the paper: the grid is cut into ``tile x tile`` tiles and each tile
  chooses its share of the destinations greedily among its own tokens, all tiles at
  once (:func:`tiled_facility_location`, ``O(N * tile^4)`` instead of the global
  greedy's ``O(D * N^2)``); ``tile=0`` runs the global greedy.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

__all__ = [
    "SoftPlan",
    "ToDoPlan",
    "facility_location",
    "soft_plan",
    "tiled_facility_location",
    "todo_downsample",
]


def _work(x: torch.Tensor) -> torch.dtype:
    """float32 at least (half-precision similarities tie too often), float64 kept."""
    return torch.promote_types(x.dtype, torch.float32)


@dataclasses.dataclass(frozen=True)
class ToDoPlan:
    """Keys and values of a self-attention from a grid downsampled by ``factor``."""

    height: int
    width: int
    factor: int
    mode: str
    batch_size: int
    num_tokens: int

    @property
    def r(self) -> int:
        """Keys and values dropped: ``N`` minus the downsampled grid's size."""
        small = -(-self.height // self.factor) * -(-self.width // self.factor)
        return self.num_tokens - small

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return todo_downsample(x, self.height, self.width, self.factor, self.mode)


def todo_downsample(
    x: torch.Tensor, height: int, width: int, factor: int, mode: str = "nearest-exact"
) -> torch.Tensor:
    """``(B, N, C)`` tokens on a ``height x width`` grid -> ``(B, N', C)`` on the grid
    ``ceil(height / factor) x ceil(width / factor)`` (``mode``: ``"nearest-exact"`` or
    ``"avg"``, the mean of each window; a partial window at an edge averages what it has)."""
    batch, _, channels = x.shape
    grid = x.transpose(1, 2).reshape(batch, channels, height, width)
    size = (-(-height // factor), -(-width // factor))
    if mode == "avg":
        small = F.avg_pool2d(grid, factor, ceil_mode=True, count_include_pad=False)
    else:
        small = F.interpolate(grid, size=size, mode=mode)
    return small.flatten(2).transpose(1, 2)


def facility_location(x: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, count)`` indices chosen greedily to maximise facility location over ``x``.

    Similarity is cosine similarity mapped to ``[0, 1]``; each step adds the token with
    the largest gain ``sum_i max(0, sim(i, j) - cover_i)`` (``cover_i``: the best
    similarity of token ``i`` to the chosen set so far). Indices come back sorted.
    """
    unit = F.normalize(x.to(_work(x)), dim=-1)
    sim = (unit @ unit.transpose(1, 2) + 1.0) / 2.0  # (B, N, N)
    batch, num = sim.shape[:2]
    cover = torch.zeros(batch, num, device=x.device, dtype=sim.dtype)
    chosen = torch.zeros(batch, num, dtype=torch.bool, device=x.device)
    picks = []
    for _ in range(count):
        gain = (sim - cover.unsqueeze(-1)).clamp_min(0).sum(1)  # (B, N): gain of each j
        gain = gain.masked_fill(chosen, -1.0)
        best = gain.argmax(-1)  # (B,)
        picks.append(best)
        chosen.scatter_(1, best[:, None], True)
        cover = torch.maximum(
            cover, sim.gather(2, best[:, None, None].expand(batch, num, 1))[..., 0]
        )
    return torch.stack(picks, 1).sort(-1).values


def tile_quotas(sizes: torch.Tensor, count: int) -> torch.Tensor:
    """Destinations per tile: ``count`` shared in proportion to the tiles' sizes (largest
    remainders get the rounding), never more than a tile holds."""
    share = sizes.double() * count / sizes.sum()
    quota = share.floor().long()
    left = count - int(quota.sum())
    if left:
        order = (share - quota).argsort(descending=True, stable=True)
        quota[order[:left]] += 1
    return quota.minimum(sizes)


def tiled_facility_location(
    x: torch.Tensor, height: int, width: int, tile: int, count: int
) -> torch.Tensor:
    """``(B, count)`` indices: each ``tile x tile`` tile of the ``height x width`` grid
    (raster order) chooses its :func:`tile_quotas` share greedily as
    :func:`facility_location` does over the tile's own tokens. Indices come back sorted."""
    batch, num = x.shape[:2]
    device = x.device
    tiles_w = -(-width // tile)
    ids = torch.arange(num, device=device)
    tile_of = (ids // width // tile) * tiles_w + (ids % width) // tile
    order = tile_of.argsort(stable=True)  # tokens grouped by tile, raster order inside
    sizes = torch.bincount(tile_of)
    tiles, longest = sizes.numel(), int(sizes.max())
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(num, device=device) - starts[tile_of[order]]
    table = torch.full((tiles, longest), -1, dtype=torch.long, device=device)
    table[tile_of[order], slot] = order
    valid = table >= 0  # (T, L)
    unit = F.normalize(x.to(_work(x)), dim=-1)
    local = unit[:, table.clamp_min(0)] * valid[None, :, :, None]  # (B, T, L, C)
    sim = (local @ local.transpose(-1, -2) + 1.0) / 2.0  # (B, T, L, L)
    sim = sim * valid[None, :, :, None]  # padding covers nothing
    quota = tile_quotas(sizes, count)
    cover = torch.zeros(batch, tiles, longest, dtype=sim.dtype, device=device)
    chosen = (~valid).expand(batch, -1, -1).clone()
    picked = torch.zeros(batch, tiles, longest, dtype=torch.bool, device=device)
    for step in range(int(quota.max())):
        active = (quota > step)[None, :].expand(batch, -1)  # (B, T)
        gain = (sim - cover.unsqueeze(-1)).clamp_min(0).sum(-2)  # (B, T, L): gain of j
        best = gain.masked_fill(chosen, -1.0).argmax(-1, keepdim=True)  # (B, T, 1)
        mark = torch.zeros_like(picked).scatter_(-1, best, True) & active[..., None]
        picked |= mark
        chosen |= mark
        column = sim.gather(-1, best[..., None].expand(-1, -1, longest, 1))[..., 0]
        cover = torch.where(active[..., None], torch.maximum(cover, column), cover)
    flat = table.expand(batch, -1, -1)[picked].view(batch, count)
    return flat.sort(-1).values


@dataclasses.dataclass(frozen=True)
class SoftPlan:
    """ToMA's merge: ``weights`` ``(B, N, D)``, each row a distribution over destinations."""

    weights: torch.Tensor
    dst_idx: torch.Tensor  # (B, D)

    @property
    def batch_size(self) -> int:
        return self.weights.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.weights.shape[1]

    @property
    def r(self) -> int:
        return self.weights.shape[1] - self.weights.shape[2]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, C)``: each destination the weighted mean of the tokens."""
        w = self.weights.to(x.dtype)
        return (w.transpose(1, 2) @ x) / w.sum(1).clamp_min(1e-6).unsqueeze(-1)

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)``: each token the weighted sum of the destinations' outputs."""
        return self.weights.to(y.dtype) @ y


def soft_plan(
    x: torch.Tensor,
    keep: int,
    tau: float,
    grid: tuple[int, int] | None = None,
    tile: int = 0,
) -> SoftPlan:
    """ToMA's plan for ``(B, N, C)`` tokens keeping ``keep`` destinations, chosen per
    ``tile x tile`` tile of ``grid`` (``tile=0`` or no grid: the global greedy)."""
    if tile and grid is not None and grid[0] * grid[1] == x.shape[1]:
        dst = tiled_facility_location(x, grid[0], grid[1], tile, keep)
    else:
        dst = facility_location(x, keep)
    unit = F.normalize(x.to(_work(x)), dim=-1)
    dst_unit = unit.gather(1, dst.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    weights = ((unit @ dst_unit.transpose(1, 2)) / tau).softmax(-1)  # (B, N, D)
    return SoftPlan(weights, dst)
