"""The decoder side of the connector's ``log(size)`` bias (:mod:`...connector.size_bias`):
attention modules that add the call's key bias to their mask.

Any decoder whose attention modules take ``hidden_states`` and an ``attention_mask`` that
is None (causal), boolean or additive ``(B|1, 1, q, kv)`` qualifies: causal decoders
(LLaMA, Qwen2, Qwen-VL's M-RoPE decoders) and prefix-LM ones (PaliGemma's and Gemma 3's
bidirectional image blocks live in the mask, which the bias is added to). The keys a
layer sees are the last ``kv`` positions of the sequence so far: all of them, except in
a sliding-window layer's decode steps (Gemma 3), whose cache keeps only the window.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ...connector.size_bias import call_bias
from ...patch import TurboPatch
from .llm import CURRENT, find_cache

__all__ = ["install_size_bias", "size_bias_refusal"]

_ATTR = "_turbo_connector_size_bias"


def _additive(
    mask: torch.Tensor | None, q_len: int, past: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The layer's mask as an additive float ``(B|1, 1, q, kv)`` (None: causal)."""
    neg = torch.finfo(dtype).min
    if mask is None:
        kv = past + q_len
        q_pos = torch.arange(past, kv, device=device)[:, None]
        allowed = torch.arange(kv, device=device)[None, :] <= q_pos
        return torch.where(allowed, 0.0, neg).to(dtype)[None, None]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg).to(dtype)
    return mask.to(dtype)


def _implementation(language_config: Any) -> str:
    return str(getattr(language_config, "_attn_implementation", None) or "")


def _takes_no_additive_mask(implementation: str) -> bool:
    return implementation.startswith("flash") or implementation == "flex_attention"


def size_bias_refusal(attentions: Sequence[nn.Module], language_config: Any) -> str | None:
    """Why these attention modules cannot carry the bias (None: they can)."""
    implementation = _implementation(language_config)
    if _takes_no_additive_mask(implementation):
        return (
            f"its language model uses {implementation!r} attention, which takes no 4-D "
            "additive mask (sdpa or eager do)"
        )
    for attn in attentions:
        parameters = inspect.signature(attn.forward).parameters
        if not {"hidden_states", "attention_mask"} <= set(parameters):
            return (
                f"its decoder attention {type(attn).__name__} takes no hidden_states / "
                "attention_mask arguments"
            )
    return None


def install_size_bias(
    patch: TurboPatch, attentions: Sequence[nn.Module], language_config: Any
) -> None:
    """Make the decoder's attention modules add the call's ``log(size)`` key bias.

    Where they cannot (:func:`size_bias_refusal`), nothing is installed and the reason
    is kept on the patch (``connector_size_bias_refusal``): a call asking for
    ``size_bias=True`` then raises it, the default (None) runs without the bias.
    """
    refusal = size_bias_refusal(attentions, language_config)
    patch.connector_size_bias_refusal = refusal  # type: ignore[attr-defined]
    if refusal is not None:
        return
    patch.connector_size_bias = True  # type: ignore[attr-defined]
    for attn in attentions:
        signature = inspect.signature(attn.forward)

        def forward(
            original: Callable[..., Any],
            *args: Any,
            _sig: Any = signature,
            _layer: int = int(getattr(attn, "layer_idx", 0) or 0),
            **kw: Any,
        ) -> Any:
            bias = call_bias(patch)
            if bias is None and getattr(find_cache(kw), _ATTR, None) is None:
                return original(*args, **kw)  # the common path: no merge, nothing to bind
            named = _sig.bind_partial(*args, **kw).arguments
            extra = named.pop("kwargs", {})
            named.update(extra)
            cache = find_cache(named)
            if bias is None:
                bias = getattr(cache, _ATTR, None)
                if bias is None:
                    return original(*args, **kw)
            elif cache is not None:
                setattr(cache, _ATTR, bias)
            _check_implementation(language_config)
            if CURRENT.get() is not None:
                raise ValueError(
                    "log(size) after a connector merge cannot be combined with llm mode (its "
                    "reduced cache re-indexes the keys); set ConnectorReduction(size_bias=False) "
                    "or use one of the two modes"
                )
            hidden = named["hidden_states"]
            q_len = hidden.shape[1]
            mask = named.get("attention_mask")
            # this layer's cache before the call's keys join it (the wrapper runs first)
            past = cache.get_seq_length(_layer) if cache is not None else 0
            additive = _additive(mask, q_len, past, hidden.dtype, hidden.device)
            kv = additive.shape[-1]
            # the keys are the last kv positions of past + q_len (a sliding-window cache
            # keeps only the window); a static cache's kv exceeds them and starts at 0
            start = max(past + q_len - kv, 0)
            keys = bias.to(hidden.dtype)[:, start : start + kv]
            if keys.shape[1] < kv:  # decode steps: new keys stand for themselves
                keys = torch.nn.functional.pad(keys, (0, kv - keys.shape[1]))
            named["attention_mask"] = additive + keys[:, None, None, :]
            return original(**named)

        patch.override(attn, "forward", forward)


def _check_implementation(language_config: Any) -> None:
    implementation = _implementation(language_config)
    if _takes_no_additive_mask(implementation):
        raise ValueError(
            "log(size) after a connector merge needs an attention that takes a 4-D additive "
            f"mask (sdpa or eager); the language model uses {implementation!r}. Set "
            "ConnectorReduction(size_bias=False)"
        )
