"""One call through the connector stage: reduce the images, shorten the prompt.

What every family shares; a family computes its image features (and guide / keys where
it has them), calls :func:`reduce_call`, then puts the kept tokens back where its
language model reads them (``mm_encoder_outputs``, deepstack features, M-RoPE positions).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..patch import TurboPatch
from .budget import ConnectorReduction
from .guides import SHARED_GUIDES, mean_query_guide, text_guide
from .record import ConnectorRecord, set_last_connector
from .runs import Shortened, shorten_runs
from .size_bias import key_bias, set_call_bias
from .stage import ImageTokens, KeptTokens, reduce_images

__all__ = ["PER_TOKEN", "ReducedCall", "check_call", "cut_call", "module_weights", "reduce_call"]

#: per-token arguments that are re-laid with ``input_ids``
PER_TOKEN = ("labels", "mm_token_type_ids", "token_type_ids")


@contextlib.contextmanager
def module_weights(module: Any) -> Iterator[None]:
    """``module``'s own parameters loaded while inside, if an accelerate hook offloads them.

    The stage encodes images before the module's forward (to shorten the prompt first);
    a parameter the module holds itself (LLaVA-NeXT's ``image_newline``) is loaded by
    its hook only around that forward, so the hook is run around the encoding too.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        yield
        return
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)


@dataclasses.dataclass
class ReducedCall:
    """The stage's result for one call: the kept tokens per image and the new layout."""

    kept: list[KeptTokens]
    shortened: Shortened
    named: dict[str, Any]


def _row_texts(
    ids: torch.Tensor, is_image: torch.Tensor, valid: torch.Tensor, embed: Callable[..., Any]
) -> list[torch.Tensor]:
    """Per row, the embeddings of its real text tokens (the instruction)."""
    text = valid & ~is_image
    with torch.no_grad():
        return [embed(ids[b][text[b]]) for b in range(ids.shape[0])]


def reduce_call(
    patch: TurboPatch,
    settings: ConnectorReduction,
    named: dict[str, Any],
    features: Sequence[torch.Tensor],
    image_token_id: int,
    pad_token_id: int,
    embed: Callable[..., Any] | None = None,
    keys: Sequence[torch.Tensor] | None = None,
    guides: Sequence[torch.Tensor] | None = None,
    guide: str = "none",
) -> ReducedCall:
    """Reduce each image of ``features`` (``(N_j, D)``, row-major order) to its budget and
    shorten ``named``'s ``input_ids`` / ``attention_mask`` / per-token arguments to match.

    ``embed`` (the language model's input embeddings) gives the instruction to methods that
    read it; ``keys`` and ``guides`` are per image, or None where the family has none.
    ``guide`` ``"mean"`` or ``"text"`` (a resolved name, :func:`.guides.resolve_guide`)
    computes the shared guide here in place of ``guides``; other names use ``guides``.

    Raises:
        ValueError: no ``input_ids`` (placeholders cannot be found in ``inputs_embeds``), a
            bad budget, or placeholders that do not match the features.
    """
    tokens = [int(f.shape[0]) for f in features]
    ids, _, is_image, valid = _check_call(named, tokens, image_token_id)
    counts = settings.counts(tokens)
    # each image's row: the row of its first placeholder (the model's scatter order)
    flat_rows = is_image.nonzero()[:, 0]
    starts = torch.tensor([0, *tokens[:-1]]).cumsum(0).tolist() if tokens else []
    rows = [int(flat_rows[s]) for s in starts]
    texts = _row_texts(ids, is_image, valid, embed) if embed is not None else None
    images = [
        ImageTokens(
            features=f,
            keys=None if keys is None else keys[j],
            guide=None if guides is None else guides[j],
            text=None if texts is None else texts[rows[j]].to(f.dtype),
        )
        for j, f in enumerate(features)
    ]
    if guide in SHARED_GUIDES:
        if guide == "text" and texts is None:
            raise ValueError("guide='text' needs the prompt's embeddings (embed=...)")
        for image in images:
            if guide == "mean" or image.text is None:
                image.guide = mean_query_guide(image.features)
            else:
                image.guide = text_guide(image.features, image.text)
    kept = reduce_images(images, counts, settings.method)
    return _cut(patch, named, tokens, kept, image_token_id, pad_token_id, settings.size_bias)


def check_call(named: dict[str, Any], tokens: Sequence[int], image_token_id: int) -> None:
    """Raise the errors :func:`reduce_call` raises for a call whose images have ``tokens``
    tokens each (before a family spends time reducing them elsewhere, e.g. in a tower)."""
    _check_call(named, tokens, image_token_id)


def _check_call(
    named: dict[str, Any], tokens: Sequence[int], image_token_id: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    ids = named.get("input_ids")
    if ids is None:
        raise ValueError(
            "connector mode needs input_ids (to shorten the image placeholders); got "
            "inputs_embeds. Pass turbo_mode='none' (or another mode) for this call"
        )
    mask = named.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"connector mode needs a 2-D attention_mask, got {tuple(mask.shape)}")
    is_image = ids == image_token_id
    valid = mask.bool() if mask is not None else torch.ones_like(is_image)
    found = int(is_image.sum())
    if found != sum(tokens):
        raise ValueError(
            f"input_ids hold {found} image placeholders but the images have "
            f"{sum(tokens)} tokens ({list(tokens)} per image)"
        )
    return ids, mask, is_image, valid


def cut_call(
    patch: TurboPatch,
    named: dict[str, Any],
    tokens: Sequence[int],
    kept: Sequence[KeptTokens],
    image_token_id: int,
    pad_token_id: int,
    size_bias: bool | None = None,
) -> ReducedCall:
    """The second half of :func:`reduce_call` for images reduced elsewhere (a family's tower
    stage): image ``j`` had ``tokens[j]`` placeholders and keeps ``kept[j]``; the runs are
    cut, the ``log(size)`` bias set (``size_bias`` as in :class:`.ConnectorReduction`) and
    the connector record written, exactly as after a connector method.

    Raises:
        ValueError: as :func:`reduce_call` does for the prompt.
    """
    _check_call(named, tokens, image_token_id)
    return _cut(patch, named, tokens, list(kept), image_token_id, pad_token_id, size_bias)


def _cut(
    patch: TurboPatch,
    named: dict[str, Any],
    tokens: Sequence[int],
    kept: list[KeptTokens],
    image_token_id: int,
    pad_token_id: int,
    size_bias: bool | None,
) -> ReducedCall:
    ids = named["input_ids"]
    mask = named.get("attention_mask")
    short = shorten_runs(
        ids, image_token_id, [k.index for k in kept], list(tokens), pad_token_id,
        attention_mask=mask, per_token={name: named.get(name) for name in PER_TOKEN},
    )  # fmt: skip
    merged = any(bool((k.sizes > 1).any()) for k in kept)
    bias = None
    if merged and size_bias is not False:
        if getattr(patch, "connector_size_bias", False):
            bias = key_bias(short.input_ids, image_token_id, [k.sizes for k in kept])
        elif size_bias:
            why = getattr(patch, "connector_size_bias_refusal", None)
            because = f" ({why})" if why else ""
            raise ValueError(
                f"size_bias=True: {patch.adapter_name} does not carry log(size) into its "
                f"language model's attention{because}; use size_bias=None or False"
            )
    set_call_bias(patch, bias)
    named = {**named, "input_ids": short.input_ids, "attention_mask": short.attention_mask}
    named.update(short.per_token)
    set_last_connector(
        patch,
        ConnectorRecord(
            tuple(tokens),
            tuple(int(k.index.numel()) for k in kept),
            tuple(k.index for k in kept),
            tuple(k.sizes for k in kept),
        ),
    )
    return ReducedCall(kept, short, named)
