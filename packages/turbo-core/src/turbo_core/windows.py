"""Window matching on a 2-D token grid: one destination per window, the rest may merge.

Used for merge-and-restore in generation (Stable Diffusion's UNet), where tokens
lie on a ``height x width`` latent grid. Each full ``sy x sx`` window holds one
destination token (its top-left one, or one chosen at random with a generator);
every other token is a source. Sources are ranked by the information degree
``E = fuse(R, A)``, with ``R`` the cosine similarity to their most similar
destination, and the ``r`` highest merge into that destination. With ``alpha = 0``
this is tomesd's random-2-D bipartite matching.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import TurboConfig
from .plan import MergePlan
from .scoring import fuse_information

__all__ = ["WindowScores", "max_window_mergeable", "score_windows", "window_destinations"]


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def window_destinations(
    height: int,
    width: int,
    sx: int,
    sy: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Raster indices of one destination token per full ``sy x sx`` window.

    Args:
        height, width: the token grid (tokens are in raster order, row by row).
        sx, sy: window width and height; a partial window at the right or bottom
            edge has no destination (its tokens are sources).
        generator: pick the destination of each window uniformly at random with it;
            None picks the top-left token of every window.
        device: where the result lives.

    Returns:
        ``(num_windows,)`` int64 indices, sorted ascending.
    """
    height, width = _check_positive("height", height), _check_positive("width", width)
    sx, sy = _check_positive("sx", sx), _check_positive("sy", sy)
    rows, cols = height // sy, width // sx
    if rows == 0 or cols == 0:
        raise ValueError(
            f"a {sy}x{sx} window (sy x sx) does not fit a {height}x{width} grid; "
            "choose sx <= width and sy <= height"
        )
    if generator is None:
        offset = torch.zeros(rows, cols, dtype=torch.long)
    else:
        offset = torch.randint(
            sx * sy, (rows, cols), generator=generator, device=generator.device
        ).cpu()
    dy, dx = offset // sx, offset % sx
    y = torch.arange(rows).unsqueeze(1) * sy + dy
    x = torch.arange(cols).unsqueeze(0) * sx + dx
    return (y * width + x).reshape(-1).to(device)


def max_window_mergeable(num_tokens: int, num_destinations: int) -> int:
    """The most tokens one window step can remove: every source, ``N - destinations``."""
    return max(num_tokens - num_destinations, 0)


@dataclasses.dataclass(frozen=True)
class WindowScores:
    """Sources ranked for merging; :meth:`plan` cuts the ranking at any ``r``.

    Attributes:
        dst_idx: ``(K,)`` int64, the destination tokens (they seed output slots 0..K-1).
        src_idx: ``(B, S)`` int64, source tokens sorted by information degree, highest
            (merged first) to lowest.
        partner: ``(B, S)`` int64, slot (= index into ``dst_idx``) each ranked source
            merges into.
        num_tokens: ``N``.
    """

    dst_idx: torch.Tensor
    src_idx: torch.Tensor
    partner: torch.Tensor
    num_tokens: int

    @property
    def max_r(self) -> int:
        """The most tokens a plan from these scores can remove."""
        return self.src_idx.shape[1]

    def plan(self, r: int) -> MergePlan:
        """Merge the ``r`` top-ranked sources; output slots: destinations, then the
        sources that stay in their original order.

        Raises:
            ValueError: if ``r`` is negative or above :attr:`max_r`.
        """
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= self.max_r:
            raise ValueError(f"r must be an int in [0, {self.max_r}] (the sources), got {r!r}")
        batch = self.src_idx.shape[0]
        if r == 0:
            return MergePlan.identity(batch, self.num_tokens, self.src_idx.device)
        stay = self.src_idx[:, r:].sort(dim=-1).values
        kept = torch.cat([self.dst_idx.expand(batch, -1), stay], dim=1)
        return MergePlan(kept, self.src_idx[:, :r], self.partner[:, :r], self.num_tokens)


def score_windows(
    metric: torch.Tensor,
    dst_idx: torch.Tensor,
    semantic: torch.Tensor | None = None,
    config: TurboConfig | None = None,
    block_index: int = 0,
) -> WindowScores:
    """Rank every source token of a ``(B, N, D)`` sequence for window merging.

    Args:
        metric: ``(B, N, D)`` similarity features (hidden states or keys).
        dst_idx: ``(K,)`` destination indices (:func:`window_destinations`).
        semantic: ``(B, N)`` semantic value of every token (needed when ``config``
            uses semantics); high values merge last.
        config: fusion settings (``alpha``, ``fusion``, ``mode``); None ranks by
            redundancy alone.
        block_index: position of the block (S4 fusion).

    Ties in degree go to the earlier source (stable sort).
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, N, D), got shape {tuple(metric.shape)}")
    batch, num_tokens = metric.shape[:2]
    if dst_idx.dim() != 1 or dst_idx.numel() == 0 or dst_idx.numel() > num_tokens:
        raise ValueError(
            f"dst_idx must be a non-empty 1-D index of at most N={num_tokens} tokens, "
            f"got shape {tuple(dst_idx.shape)}"
        )
    if semantic is not None and semantic.shape != (batch, num_tokens):
        raise ValueError(
            f"semantic must be (B, N) = {(batch, num_tokens)}, got {tuple(semantic.shape)}"
        )
    device = metric.device
    # the complement where dst_idx lives (pass it on the CPU: no device sync for nonzero)
    is_src = torch.ones(num_tokens, dtype=torch.bool, device=dst_idx.device)
    is_src[dst_idx] = False
    src_all = is_src.nonzero().squeeze(1).to(device)  # (S,), ascending
    dst_idx = dst_idx.to(device)
    work = torch.promote_types(metric.dtype, torch.float32)
    normed = metric.to(work)
    normed = normed / normed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = normed[:, src_all] @ normed[:, dst_idx].transpose(-1, -2)  # (B, S, K)
    redundancy, partner = similarity.max(dim=-1)
    if config is not None:
        semantic_src = None if semantic is None else semantic[:, src_all].to(work)
        degree = fuse_information(redundancy, semantic_src, config, block_index)
    else:
        degree = redundancy
    order = degree.sort(dim=-1, descending=True, stable=True).indices  # (B, S)
    return WindowScores(
        dst_idx=dst_idx,
        src_idx=src_all[order],
        partner=partner.gather(1, order),
        num_tokens=num_tokens,
    )
