"""``log(size)`` in the language model's attention after a connector merge.

A connector method that merges tokens hands the language model one token for ``s``
inputs; proportional attention (the method doc: ``softmax(QK^T / sqrt(d) + log s)``)
lets it weigh as the ``s`` tokens it stands for. The stage records, per call, a key bias
``(B, L)`` over the shortened prompt (``log(size)`` at each image placeholder, 0
elsewhere); the decoder's attention modules add it to their mask's key columns (decode
steps see 0 for their new keys; installed by
:func:`turbo_adapters.families.llava.size_bias.install_size_bias`). The bias lives in the call's scope (a ``forward`` or a
whole ``generate``) and on the KV cache the prefill filled, so decoding by hand with that
cache keeps it.

Only calls where some size exceeds 1 are touched: a method that keeps or drops tokens
(sizes 1) runs the decoder exactly as unpatched.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..patch import TurboPatch

__all__ = ["call_bias", "call_scope", "key_bias", "set_call_bias"]

_BOX: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "turbo_connector_size_bias", default=None
)


@contextlib.contextmanager
def call_scope() -> Iterator[None]:
    """One model call's scope (the outermost entry point opens it; nested ones share it)."""
    if _BOX.get() is not None:
        yield
        return
    token = _BOX.set({})
    try:
        yield
    finally:
        _BOX.reset(token)


def key_bias(
    input_ids: torch.Tensor, image_token_id: int, sizes: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``(B, L)`` float: ``log(size)`` of each image token at its placeholder (row-major
    scatter order, the models' own), 0 at every other position."""
    bias = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if sizes:
        flat = torch.cat([s.reshape(-1).float() for s in sizes]).to(bias.device)
        bias[input_ids == image_token_id] = flat.clamp(min=1).log()
    return bias


def call_bias(patch: TurboPatch) -> torch.Tensor | None:
    """This call's key bias for ``patch`` (None outside a call or without a merge)."""
    box = _BOX.get()
    return None if box is None else box.get(id(patch))


def set_call_bias(patch: TurboPatch, bias: torch.Tensor | None) -> None:
    """Record this call's key bias for ``patch``'s decoder (None: no merge in this call)."""
    box = _BOX.get()
    if box is not None:
        box[id(patch)] = bias
