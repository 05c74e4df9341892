"""Running a connector method on a call's images: grouped, checked, keep-all exact.

Images of one call may differ in token count (Qwen's dynamic resolution, LLaVA-NeXT's
crops) and in budget (per-image counts), while a method takes a ``(B, N, D)`` batch:
images with the same ``(N, K)`` are stacked into one call of the method. An image whose
budget keeps all its tokens is passed through untouched (the method is not called), so
keeping everything is exactly the unpatched model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from turbo_core.connector import ConnectorInputs, check_reduced, get_connector_method

__all__ = ["ImageTokens", "KeptTokens", "reduce_images"]


@dataclasses.dataclass
class ImageTokens:
    """One image's tokens and what a method may look at.

    Attributes:
        features: ``(N, D)`` as they would enter the language model.
        keys: ``(N, Dk)`` similarity features, or None.
        guide: ``(N,)`` semantic attention, or None.
        text: ``(T, D)`` the prompt's text embeddings (its row's), or None.
    """

    features: torch.Tensor
    keys: torch.Tensor | None = None
    guide: torch.Tensor | None = None
    text: torch.Tensor | None = None


@dataclasses.dataclass
class KeptTokens:
    """One image after the stage: ``tokens (K, D)``, ``sizes (K,)``, ``index (K,)``."""

    tokens: torch.Tensor
    sizes: torch.Tensor
    index: torch.Tensor


def _stack(values: list[torch.Tensor | None]) -> torch.Tensor | None:
    if any(v is None for v in values):
        return None
    return torch.stack(values)  # type: ignore[arg-type]


def _stack_text(
    values: list[torch.Tensor | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Texts of different lengths, right-padded with zeros, and their mask."""
    if any(v is None for v in values):
        return None, None
    texts = [v for v in values if v is not None]
    width = max(t.shape[0] for t in texts)
    out = texts[0].new_zeros(len(texts), width, texts[0].shape[-1])
    mask = torch.zeros(len(texts), width, dtype=torch.bool, device=out.device)
    for i, t in enumerate(texts):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def reduce_images(
    images: Sequence[ImageTokens], counts: Sequence[int], method: str
) -> list[KeptTokens]:
    """Each image reduced to ``counts[j]`` tokens by the connector method ``method``.

    Raises:
        ValueError: an unknown method (the error lists the registered ones).
        RuntimeError: the method returned something that breaks the connector contract.
    """
    out: list[KeptTokens | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for j, (image, k) in enumerate(zip(images, counts, strict=True)):
        n = image.features.shape[0]
        if k >= n:
            ones = image.features.new_ones(n)
            index = torch.arange(n, device=image.features.device)
            out[j] = KeptTokens(image.features, ones, index)
        else:
            groups.setdefault((n, k), []).append(j)
    if groups:
        fn = get_connector_method(method)
    for (_, k), members in groups.items():
        chosen = [images[j] for j in members]
        text, text_mask = _stack_text([i.text for i in chosen])
        inputs = ConnectorInputs(
            features=torch.stack([i.features for i in chosen]),
            keys=_stack([i.keys for i in chosen]),
            guide=_stack([i.guide for i in chosen]),
            text=text,
            text_mask=text_mask,
        )
        reduced = fn(inputs, k)
        try:
            check_reduced(inputs, k, reduced)
        except AssertionError as broken:
            raise RuntimeError(
                f"connector method {method!r} broke the contract: {broken}"
            ) from None
        for row, j in enumerate(members):
            out[j] = KeptTokens(reduced.tokens[row], reduced.sizes[row], reduced.index[row])
    return [o for o in out if o is not None]
