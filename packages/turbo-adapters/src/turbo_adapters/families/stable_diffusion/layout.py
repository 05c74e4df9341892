"""Where the image tokens of a diffusers transformer block are merged and restored.

One :class:`Slot` per sub-module that merges its input and restores its output. The
settings' components (``attn1``, ``attn2``, ``ff``) map onto each block class's own
modules:

- ``BasicTransformerBlock`` (UNets, PixArt): ``attn1`` (self-attention), ``attn2``
  (cross-attention), ``ff``;
- ``JointTransformerBlock`` (SD3 / SD3.5 MMDiT): the joint attention ``attn`` (image
  and text arrive as separate arguments; only the image part merges, ``out[0]`` is
  restored) and SD3.5's extra image self-attention ``attn2`` are ``attn1``; ``ff`` is
  the image feed-forward (``ff_context``, the text's, never merges);
- ``FluxTransformerBlock`` (FLUX double stream): as SD3, with the rotary rows of the
  merged sequence following the merge;
- ``FluxSingleTransformerBlock``: text and image are one ``[text; image]`` sequence, so
  only its image part (after the text prefix) merges: ``attn`` is ``attn1``, the MLP
  branch ``proj_mlp`` and the output projection ``proj_out`` are ``ff``. The attention
  and ``proj_mlp`` read one normed input and ``proj_out`` reads their concatenation, so
  when both components follow one plan the block is a *chain*: the input merges once
  (``attn`` and ``proj_mlp`` keep their merged outputs) and ``proj_out`` restores once.
  Merging a restored sequence again gives it back unchanged (every copy of a merged
  token is equal), so the chain computes what merging each slot apart does, without the
  restore and re-merge of the ``5 x`` wide concatenation.

The token grid of a diffusion transformer comes from the model (:func:`model_grid`), not
from a ``Transformer2DModel`` inside it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

__all__ = ["Slot", "block_slots", "model_grid"]


@dataclasses.dataclass(frozen=True)
class Slot:
    """One merging sub-module of a block.

    Attributes:
        component: the settings' component whose ratio applies (``attn1``/``attn2``/``ff``).
        module: the block's attribute holding the sub-module.
        prefix: the input is ``[text; image]``; the text prefix never merges.
        rotary: the call carries ``image_rotary_emb`` rows for ``[text; image]``.
        kv: ``attn1_kv`` (merge keys/values only) applies to this self-attention.
        chain: ``"in"``: in a chained block, merges its input and keeps its output merged;
            ``"out"``: in a chained block, its input is already merged, it restores.
    """

    component: str
    module: str
    prefix: bool = False
    rotary: bool = False
    kv: bool = False
    chain: str = ""


def block_slots(block: nn.Module) -> tuple[Slot, ...]:
    """The slots of ``block`` by its class name (diffusers' blocks), or ``()``."""
    kind = type(block).__name__
    if kind == "JointTransformerBlock":
        slots = [Slot("attn1", "attn")]
        if getattr(block, "attn2", None) is not None:  # SD3.5: image-only self-attention
            slots.append(Slot("attn1", "attn2"))
        return (*slots, Slot("ff", "ff"))
    if kind == "FluxTransformerBlock":
        return (Slot("attn1", "attn", rotary=True), Slot("ff", "ff"))
    if kind == "FluxSingleTransformerBlock":
        return (
            Slot("attn1", "attn", prefix=True, rotary=True, chain="in"),
            Slot("ff", "proj_mlp", prefix=True, chain="in"),
            Slot("ff", "proj_out", prefix=True, chain="out"),
        )
    if kind.endswith("TransformerBlock") and all(
        hasattr(block, c) for c in ("attn1", "attn2", "ff")
    ):
        slots = [Slot("attn1", "attn1", kv=True)]
        if block.attn2 is not None:
            slots.append(Slot("attn2", "attn2"))
        if block.ff is not None:
            slots.append(Slot("ff", "ff"))
        return tuple(slots)
    return ()


def model_grid(model: nn.Module, sample: Any, kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """``(height, width)`` of the image tokens of one call of a diffusion transformer.

    A patchifying model (PixArt, SD3, DiT ...) gets ``(B, C, H, W)`` and its config's
    ``patch_size``: the grid is ``(H / p, W / p)``. FLUX gets packed tokens and their
    ``img_ids`` (``(N, 3)`` of ``[0, row, col]``): the grid is their extent, when the
    ids tile it in raster order. None when neither applies.
    """
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None)
    if isinstance(sample, torch.Tensor) and sample.dim() == 4 and isinstance(patch, int):
        return sample.shape[-2] // patch, sample.shape[-1] // patch
    ids = kwargs.get("img_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() in (2, 3) and ids.shape[-1] == 3:
        ids = ids[0] if ids.dim() == 3 else ids
        rows, cols = ids[:, 1].long(), ids[:, 2].long()
        height, width = int(rows.max()) + 1, int(cols.max()) + 1
        raster = rows * width + cols
        if height * width == ids.shape[0] and torch.equal(
            raster, torch.arange(ids.shape[0], device=raster.device)
        ):
            return height, width
    return None
