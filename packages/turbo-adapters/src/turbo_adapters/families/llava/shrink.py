"""Shrinking image placeholder runs in ``input_ids`` to the merged token count (tower mode).

The processor writes ``image_seq_length`` placeholder tokens per image; after merging
in the tower each image yields fewer features, so every image's run keeps only its
first ``merged`` placeholders. Rows are re-padded to a common length on the side
they were padded on, with a fresh attention mask (and labels, position ids).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Shrunk", "shrink_placeholders"]


@dataclasses.dataclass
class Shrunk:
    """The rewritten inputs of one call.

    Attributes:
        input_ids: ``(B, N')`` with every image run cut to the merged count.
        attention_mask: ``(B, N')`` 1 at real tokens (None if no row needs padding
            and none was given).
        labels: ``(B, N')`` or None.
        keep: ``(B, N)`` bool, the original positions that stayed (valid tokens only).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    keep: torch.Tensor


def shrink_placeholders(
    input_ids: torch.Tensor,
    image_token_id: int,
    per_image: int,
    merged: int,
    pad_token_id: int,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> Shrunk:
    """Cut each image's ``per_image`` placeholders to ``merged`` and re-pad the rows.

    Raises:
        ValueError: if a row's placeholder count is not a multiple of ``per_image``.
    """
    if not 0 < merged <= per_image:
        raise ValueError(f"merged must be in [1, {per_image}], got {merged}")
    valid = (
        attention_mask.bool()
        if attention_mask is not None
        else torch.ones_like(input_ids, dtype=torch.bool)
    )
    is_image = (input_ids == image_token_id) & valid
    counts = is_image.sum(-1)
    if bool((counts % per_image != 0).any()):
        raise ValueError(
            f"image placeholder counts per row {counts.tolist()} are not multiples of "
            f"{per_image} (the tokens per image before merging)"
        )
    position = (is_image.cumsum(-1) - 1) % per_image  # index within the image's run
    keep = valid & (~is_image | (position < merged))
    lengths = keep.sum(-1)
    width = int(lengths.max())
    # left padding (what generation needs) unless the caller padded on the right
    right = attention_mask is not None and bool((attention_mask[:, -1] == 0).any())
    batch = input_ids.shape[0]
    ids = input_ids.new_full((batch, width), pad_token_id)
    mask = input_ids.new_zeros((batch, width))
    new_labels = None if labels is None else labels.new_full((batch, width), -100)
    for b in range(batch):
        n = int(lengths[b])
        cols = slice(0, n) if right else slice(width - n, width)
        ids[b, cols] = input_ids[b][keep[b]]
        mask[b, cols] = 1
        if labels is not None and new_labels is not None:
            new_labels[b, cols] = labels[b][keep[b]]
    need_mask = attention_mask is not None or bool((lengths != width).any())
    return Shrunk(ids, mask if need_mask else None, new_labels, keep)
