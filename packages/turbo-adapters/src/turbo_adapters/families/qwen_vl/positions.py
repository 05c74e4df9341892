"""M-RoPE positions of the kept image and video tokens (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

The model computes a prompt's 3-D positions in ``get_rope_index``, asking
``get_vision_position_ids`` for each image's (and each video's) full ``(t, h, w)`` grid and
advancing the text position by the grid's extent (not by the token count). While a
connector call is active, the two wrappers below hand each image and each video only its
kept tokens' grid positions; the text after them keeps its positions, and ``rope_deltas``
(which decode steps use) come out right for the shortened prompt.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ...patch import TurboPatch
from ..llava.llm import bind_arguments

__all__ = ["install_positions", "kept_positions"]

#: per image and per video (batch order), the kept tokens' indices, while a connector call
#: runs (videos None: every video keeps all its positions)
_KEPT: contextvars.ContextVar[
    tuple[Sequence[torch.Tensor], Sequence[torch.Tensor] | None] | None
] = contextvars.ContextVar("turbo_qwen_kept", default=None)
#: during one get_rope_index: per vision group in its order, the indices (None: all)
_QUEUE: contextvars.ContextVar[Iterator[torch.Tensor | None] | None] = contextvars.ContextVar(
    "turbo_qwen_queue", default=None
)


@contextlib.contextmanager
def kept_positions(
    kept: Sequence[torch.Tensor], videos: Sequence[torch.Tensor] | None = None
) -> Iterator[None]:
    """Inside, position computations give image ``j`` the positions of ``kept[j]`` only,
    and the ``v``-th video run of the prompt those of ``videos[v]`` (Qwen2/2.5-VL: one run
    per video, indices into its ``t * h * w / 4`` tokens, frame group after frame group;
    Qwen3-VL: one run per frame group, indices into its ``h * w / 4`` tokens; None: videos
    keep all their positions)."""
    token = _KEPT.set((kept, videos))
    try:
        yield
    finally:
        _KEPT.reset(token)


def _groups(types: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
    """The modality of every vision group (1 image, 2 video), rows in order."""
    order = []
    for b in range(types.shape[0]):
        row = types[b] if mask is None else types[b][mask[b].bool()]
        order += [key for key, _ in itertools.groupby(row.tolist()) if key != 0]
    return order


def install_positions(patch: TurboPatch, inner: nn.Module) -> None:
    """Wrap ``inner.get_rope_index`` and ``inner.get_vision_position_ids``."""

    def rope_index(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kept = _KEPT.get()
        if kept is None:
            return original(*args, **kwargs)
        named = bind_arguments(original, args, kwargs)
        order = _groups(named["mm_token_type_ids"], named.get("attention_mask"))
        images = iter(kept[0])
        videos = iter(kept[1]) if kept[1] is not None else None
        queue = iter(
            [
                next(images, None) if key == 1
                else next(videos, None) if key == 2 and videos is not None
                else None
                for key in order
            ]
        )  # fmt: skip
        token = _QUEUE.set(queue)
        try:
            return original(*args, **kwargs)
        finally:
            _QUEUE.reset(token)

    def vision_positions(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        full = original(*args, **kwargs)  # (3, t * h * w)
        queue = _QUEUE.get()
        index = next(queue, None) if queue is not None else None
        return full if index is None else full[:, index.to(full.device)]

    patch.override(inner, "get_rope_index", rope_index)
    patch.override(inner, "get_vision_position_ids", vision_positions)
