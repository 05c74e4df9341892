"""The connector stage on LLaVA-1.5 and LLaVA-NeXT: the projected image tokens reduced to a
budget before they enter the language model.

The features come from the model's own ``get_image_features`` (or the call's
``mm_encoder_outputs``, e.g. after tower mode); each image's placeholder run is cut to
its kept tokens and the rows re-padded (:mod:`turbo_adapters.connector`).

Guide and keys: on LLaVA-1.5 with one ``vision_feature_layer`` the CLIP layer that
produces the features gives both, read from its own input with its q/k projections: the
CLS token's attention (heads averaged, softmax) and the keys (heads averaged), CLS
column dropped with the ``"default"`` strategy (``guide="cls"``, the default here; when a
call cannot read it, e.g. several feature layers or tokens merged in the tower,
``"auto"`` falls back to ``"mean"`` and an explicit ``"cls"`` raises). LLaVA-NeXT packs
crops with newline tokens, which no single attention map covers: ``"mean"`` (default)
or ``"text"`` there (the newline tokens are reduced like the others).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...connector import ConnectorReduction
from ...connector.calls import module_weights, reduce_call
from ...connector.guides import resolve_guide

__all__ = ["clip_guide", "connector_shrink"]


def _feature_layer(
    inner: nn.Module, layers: list[nn.Module], named: dict[str, Any]
) -> nn.Module | None:
    """The CLIP layer whose output is the feature layer (None for several layers)."""
    layer = named.get("vision_feature_layer")
    layer = inner.config.vision_feature_layer if layer is None else layer
    if not isinstance(layer, int):
        return None
    index = layer if layer >= 0 else len(layers) + 1 + layer  # into hidden_states
    return layers[index - 1] if index >= 1 else None


@contextlib.contextmanager
def clip_guide(attn: nn.Module, found: dict[str, torch.Tensor]) -> Iterator[None]:
    """While inside, a forward of CLIP attention ``attn`` leaves its CLS attention row
    ``(B, N+1)`` and its keys ``(B, N+1, d)`` (heads averaged) in ``found``."""

    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        batch, n, _ = x.shape
        heads = module.num_heads
        with torch.no_grad():
            q = module.q_proj(x[:, :1]).view(batch, 1, heads, -1).transpose(1, 2)
            k = module.k_proj(x).view(batch, n, heads, -1).transpose(1, 2)
            row = ((q.float() @ k.float().transpose(-1, -2)) * module.scale).softmax(-1)
        found["guide"] = row[:, :, 0].mean(1)
        found["keys"] = k.mean(1)

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _features(
    inner: nn.Module, named: dict[str, Any], guided: bool
) -> tuple[Any, list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """(the encoder output, per-image features, per-image keys, per-image guides)."""
    given = (named.get("mm_encoder_outputs") or {}).get("image")
    if given is not None:
        return given, list(given.pooler_output), None, None
    kwargs = {
        "pixel_values": named["pixel_values"],
        "vision_feature_layer": named.get("vision_feature_layer"),
        "vision_feature_select_strategy": named.get("vision_feature_select_strategy"),
        "return_dict": True,
    }
    if named.get("image_sizes") is not None:
        kwargs["image_sizes"] = named["image_sizes"]
    found: dict[str, torch.Tensor] = {}
    tower = inner.vision_tower
    layers = [m for m in tower.modules() if type(m).__name__ == "CLIPEncoderLayer"]
    layer = _feature_layer(inner, layers, named) if guided and layers else None
    scope = clip_guide(layer.self_attn, found) if layer is not None else contextlib.nullcontext()
    with scope, module_weights(inner):
        output = inner.get_image_features(**kwargs)
    features = list(output.pooler_output)
    if "guide" not in found:
        return output, features, None, None
    guide, keys = found["guide"], found["keys"]
    strategy = named.get("vision_feature_select_strategy")
    strategy = inner.config.vision_feature_select_strategy if strategy is None else strategy
    if strategy == "default":
        guide, keys = guide[:, 1:], keys[:, 1:]
    if guide.shape[0] != len(features) or guide.shape[1] != features[0].shape[0]:
        return output, features, None, None  # tokens merged in the tower: no one-to-one map
    return output, features, list(keys), list(guide)


def connector_shrink(
    patch: Any,
    settings: ConnectorReduction,
    inner: nn.Module,
    named: dict[str, Any],
    pad_token_id: int,
    guided: bool,
) -> dict[str, Any]:
    """Connector mode for one call: features reduced, placeholders cut, features handed on."""
    if named.get("pixel_values") is None and not (named.get("mm_encoder_outputs") or {}).get(
        "image"
    ):
        return named
    if named.get("input_ids") is None:
        raise ValueError(
            "connector mode needs input_ids (to shorten the image placeholders); got "
            "inputs_embeds. Pass turbo_mode='llm' or 'none' for this call"
        )
    own = ("cls",) if guided else ()
    guide = resolve_guide(settings.guide, own, own[0] if own else "mean", "llava")
    output, features, keys, guides = _features(inner, named, guided)
    if guide == "cls" and guides is None:
        if settings.guide == "cls":
            raise ValueError(
                "guide='cls' needs one vision_feature_layer and the tower's tokens unmerged; "
                "this call has neither. Use guide='mean' or 'text'"
            )
        guide = "mean"  # "auto": the CLS row cannot be read in this call
    done = reduce_call(
        patch, settings, named, features, int(inner.config.image_token_id), pad_token_id,
        embed=inner.get_input_embeddings(), keys=keys,
        guides=guides if guide == "cls" else None, guide=guide,
    )  # fmt: skip
    named = done.named
    output = copy.copy(output)
    output.pooler_output = [k.tokens for k in done.kept]
    named.pop("pixel_values", None)
    named.pop("image_sizes", None)
    named["mm_encoder_outputs"] = {**(named.get("mm_encoder_outputs") or {}), "image": output}
    if named.get("position_ids") is not None:
        mask = named.get("attention_mask")
        named["position_ids"] = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    return named
