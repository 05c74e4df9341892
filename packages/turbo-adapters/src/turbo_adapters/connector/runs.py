"""Placeholder runs shortened to the kept tokens, and the rows re-laid with fresh padding.

A model scatters image features into its placeholder tokens in row-major order: image
``j`` fills the next ``N_j`` placeholders. After the connector stage image ``j`` keeps
the tokens at ``index_j`` (ascending, within its own ``N_j``), so exactly those
placeholders stay; text, and every per-token tensor that goes with ``input_ids``
(labels, token types), follows. Rows are re-padded on the side they were padded on
(left unless the caller padded right), as generation needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

__all__ = ["Shortened", "shorten_runs"]

#: what a per-token tensor's padding slots hold
_FILL = {"labels": -100}


@dataclasses.dataclass
class Shortened:
    """The rewritten inputs of one call.

    Attributes:
        input_ids: ``(B, L')`` with each image's run cut to its kept placeholders.
        attention_mask: ``(B, L')`` 1 at real tokens (None when none was given and no row
            needs padding).
        per_token: the other per-token tensors, re-laid like ``input_ids``.
        columns: ``(B, L')`` the original column of every slot (0 at padding slots).
        keep: ``(B, L)`` bool, the original positions that stayed.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    per_token: dict[str, torch.Tensor]
    columns: torch.Tensor
    keep: torch.Tensor


def shorten_runs(
    input_ids: torch.Tensor,
    image_token_id: int,
    kept: Sequence[torch.Tensor],
    counts: Sequence[int],
    pad_token_id: int,
    attention_mask: torch.Tensor | None = None,
    per_token: Mapping[str, torch.Tensor | None] | None = None,
) -> Shortened:
    """Keep, of image ``j``'s ``counts[j]`` placeholders, those at ``kept[j]``.

    Args:
        input_ids: ``(B, L)``.
        image_token_id: the placeholder token.
        kept: per image (row-major order), the ascending positions kept within its run.
        counts: per image, its placeholder count before shortening.
        pad_token_id: written at padding slots.
        attention_mask: ``(B, L)`` 1 at real tokens, or None.
        per_token: other ``(B, L)`` tensors to re-lay (None values are skipped).

    Raises:
        ValueError: if the placeholders in ``input_ids`` do not add up to ``counts``.
    """
    batch, _length = input_ids.shape
    device = input_ids.device
    is_image = input_ids == image_token_id
    total = int(is_image.sum())
    if total != sum(counts):
        raise ValueError(
            f"input_ids hold {total} image placeholders but the images have "
            f"{sum(counts)} tokens ({list(counts)} per image)"
        )
    valid = (
        attention_mask.bool()
        if attention_mask is not None
        else torch.ones_like(input_ids, dtype=torch.bool)
    )
    keep = valid & ~is_image
    flat = is_image.flatten().nonzero().squeeze(-1)  # row-major: the model's scatter order
    offsets = torch.tensor([0, *counts], device=device).cumsum(0)
    chosen = [flat[int(offsets[j]) + idx.to(device)] for j, idx in enumerate(kept)]
    if chosen:
        keep.view(-1)[torch.cat(chosen)] = True
    lengths = keep.sum(-1)
    width = int(lengths.max())
    right = attention_mask is not None and bool((attention_mask[:, -1] == 0).any())
    columns = torch.zeros(batch, width, dtype=torch.long, device=device)
    slot_valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
    for b in range(batch):
        n = int(lengths[b])
        cols = slice(0, n) if right else slice(width - n, width)
        columns[b, cols] = keep[b].nonzero().squeeze(-1)
        slot_valid[b, cols] = True

    def relay(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = values.gather(1, columns.to(values.device))
        return out.masked_fill(~slot_valid.to(values.device), fill)

    ids = relay(input_ids, pad_token_id)
    mask = slot_valid.to(input_ids.dtype if attention_mask is None else attention_mask.dtype)
    need_mask = attention_mask is not None or bool((lengths != width).any())
    others = {
        name: relay(value, _FILL.get(name, 0))
        for name, value in (per_token or {}).items()
        if value is not None
    }
    return Shortened(ids, mask if need_mask else None, others, columns, keep)
