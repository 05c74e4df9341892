"""transformers ViT and DeiT (``ViTModel``, ``ViTForImageClassification``, ``DeiT*``).

The model's own modules and weights stay in place: the models, their layers and their
attention modules get Turbo subclasses. The attention reads q/k/v from the module's own
``q_proj``/``k_proj``/``v_proj`` Linear layers, runs fused SDPA with the ``log(size)``
bias and records what the layer needs to merge; the layer merges after the attention
residual and before ``layernorm_after`` and the MLP. Head counts come from the tensors
at run time, so a layer whose Linear layers were pruned to fewer heads still works.

This module also holds the pieces the other transformers adapters (``dinov2_hf``,
``clip``) share: the attention mixin and the model-level scope mixin.

``output_attentions=True`` works while Turbo is active: those passes materialise the
attention probabilities (including the ``log(size)`` bias), one ``(B, H, N_l, N_l)``
tensor per layer with ``N_l`` that layer's token count; all other passes stay fused.
Gradient checkpointing is refused while merging (the backward recompute would run
outside the forward pass's reduction state). Supports the transformers 5 layout;
transformers 4 (``attention.attention.query``) is refused with a clear error.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from turbo_core import ReductionState, TurboConfig

from .common import fused_attention, make_handle
from .handle import TurboHandle
from .registry import register_adapter

__all__ = [
    "HFViTAdapter",
    "TurboHFAttention",
    "TurboHFScope",
    "find_one",
    "hf_attention_projections",
    "layer_attentions",
    "patch_layers",
    "refuse_checkpointing",
    "swap_hf_class",
]

_QKV = ("q_proj", "k_proj", "v_proj")
_OUT = ("o_proj", "out_proj")  # ViT/DeiT/DINOv2 name it o_proj, CLIP out_proj


# --------------------------------------------------------------------------- helpers
def hf_attention_projections(attention: nn.Module) -> tuple[nn.Module, ...]:
    """The ``(q, k, v, out)`` projection modules of a transformers 5 self-attention.

    Raises:
        TypeError: the module lacks them (for example the transformers 4 layout).
    """
    found = [getattr(attention, name, None) for name in _QKV]
    out = next((getattr(attention, n) for n in _OUT if hasattr(attention, n)), None)
    if any(m is None for m in found) or out is None or not hasattr(attention, "head_dim"):
        raise TypeError(
            f"{type(attention).__name__} has no q_proj/k_proj/v_proj/o_proj and head_dim; "
            "Turbo's transformers adapters support the transformers>=5 attention layout"
        )
    return (*found, out)


def swap_hf_class(handle: TurboHandle, module: nn.Module, mixin: type) -> None:
    """``handle.swap_class`` that keeps transformers' output recording working.

    transformers looks up which outputs a model can record (``output_hidden_states``,
    ``output_attentions``) by the model's class name, registered at ``__init__``; the
    Turbo subclass has another name, so its entry is copied over.
    """
    recordable = _recordable_outputs(module)
    handle.swap_class(module, mixin)
    if recordable is not None:
        registry, value = recordable
        registry[module] = value


def _recordable_outputs(module: nn.Module) -> tuple[Any, Any] | None:
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # other transformers versions: nothing to keep
        return None
    if not isinstance(module, PreTrainedModel):
        return None
    return _CAN_RECORD_REGISTRY, _CAN_RECORD_REGISTRY.get(module)


def refuse_checkpointing(layer: nn.Module) -> None:
    """Gradient checkpointing re-runs a layer in backward, outside the reduction state."""
    if getattr(layer, "gradient_checkpointing", False) and layer.training:
        raise RuntimeError(
            "Turbo cannot merge tokens under gradient checkpointing (the backward recompute "
            "runs outside the forward pass); call model.gradient_checkpointing_disable() or "
            "turbo_adapters.remove(model)"
        )


def _dropout_p(attention: nn.Module) -> float:
    p = getattr(attention, "attention_dropout", getattr(attention, "dropout", 0.0))
    return float(p.p if isinstance(p, nn.Dropout) else p or 0.0)


def _wants_attentions(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    config = getattr(module, "config", None)
    return bool(kwargs.get("output_attentions", getattr(config, "output_attentions", False)))


def _explicit_attention(
    handle: TurboHandle,
    state: ReductionState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with materialised probabilities, for ``output_attentions=True``."""
    logits = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, N)
    bias = handle.attention_bias(state, q.dtype)
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    out = F.dropout(probs, p=dropout_p, training=dropout_p > 0) @ v
    handle.observe_attention(state, q, k, scale)
    return out, probs


# ---------------------------------------------------------------------------- mixins
class TurboHFAttention:
    """Mixin for transformers 5 self-attention modules (ViT, DeiT, DINOv2, CLIP)."""

    _turbo_handle: TurboHandle

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        handle = self._turbo_handle
        state = handle.current_state()
        if state is None:
            return super().forward(hidden_states, attention_mask, **kwargs)  # type: ignore[misc]
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is not supported while Turbo merges tokens: the mask would "
                "no longer line up with the merged sequence"
            )
        q_proj, k_proj, v_proj, out_proj = hf_attention_projections(self)  # type: ignore[arg-type]
        batch, tokens, _ = hidden_states.shape
        head_dim = int(self.head_dim)  # type: ignore[attr-defined]
        # (B, N, H*D) -> (B, H, N, D); H comes from the tensor, so pruned heads work
        q, k, v = (
            p(hidden_states).view(batch, tokens, -1, head_dim).transpose(1, 2)
            for p in (q_proj, k_proj, v_proj)
        )
        scale = getattr(self, "scaling", None) or getattr(self, "scale", None) or head_dim**-0.5
        dropout = _dropout_p(self) if self.training else 0.0  # type: ignore[attr-defined,arg-type]
        weights = None
        if _wants_attentions(self, kwargs):  # type: ignore[arg-type]
            out, weights = _explicit_attention(handle, state, q, k, v, scale, dropout)
        else:
            out = fused_attention(handle, state, q, k, v, scale, dropout)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)  # (B, N, H*D)
        return out_proj(out), weights


class TurboHFScope:
    """Mixin for a model: one reduction state per forward pass (nested calls share it)."""

    _turbo_handle: TurboHandle

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._turbo_handle.forward_scope():
            return super().forward(*args, **kwargs)  # type: ignore[misc]


class _TurboViTLayer:
    """Mixin for ``ViTLayer`` / ``DeiTLayer``: merge between attention and MLP."""

    _turbo_handle: TurboHandle

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        handle = self._turbo_handle
        state = handle.current_state()
        if state is None:
            return super().forward(hidden_states, attention_mask, **kwargs)  # type: ignore[misc]
        refuse_checkpointing(self)  # type: ignore[arg-type]
        attended, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        x = self.dropout(attended) + hidden_states
        x = handle.step(x, state)  # (B, N, C) -> (B, N - r, C)
        return self.dropout(self.mlp(self.layernorm_after(x))) + x


# --------------------------------------------------------------------------- adapter
def _vit_classes() -> dict[str, tuple[type, ...]]:
    from transformers.models.deit import modeling_deit as deit
    from transformers.models.vit import modeling_vit as vit

    return {
        # models whose heads read only the CLS (and distillation) token
        "models": (
            vit.ViTModel,
            vit.ViTForImageClassification,
            deit.DeiTModel,
            deit.DeiTForImageClassification,
            deit.DeiTForImageClassificationWithTeacher,
        ),
        "backbones": (vit.ViTModel, deit.DeiTModel),
        "layers": (vit.ViTLayer, deit.DeiTLayer),
        "attentions": (vit.ViTAttention, deit.DeiTAttention),
    }


def find_one(model: nn.Module, classes: tuple[type, ...], what: str) -> nn.Module:
    """The single submodule (or ``model`` itself) that is an instance of ``classes``."""
    found = [m for m in model.modules() if isinstance(m, classes)]
    if len(found) != 1:
        raise TypeError(
            f"expected exactly one {what} in {type(model).__name__}, found {len(found)}"
        )
    return found[0]


class HFAdapterBase:
    """What the transformers adapters share: matching and finding layers by class.

    Subclasses set ``classes`` to a function returning ``{"models", "layers",
    "attentions", ...}`` tuples of transformers classes (imported lazily).
    """

    classes: Any

    def matches(self, model: nn.Module) -> bool:
        if "transformers" not in sys.modules:  # cannot be a transformers model
            return False
        try:
            found = self.classes()
        except ImportError:
            return False
        return isinstance(model, found["models"])

    def layer_pairs(
        self, root: nn.Module, classes: dict[str, Any], what: str
    ) -> list[tuple[nn.Module, nn.Module]]:
        """Every ``classes["layers"]`` module under ``root`` with its self-attention."""
        layers = [m for m in root.modules() if isinstance(m, classes["layers"])]
        if not layers:
            raise TypeError(f"{type(root).__name__} has no {what} to patch")
        return layer_attentions(layers, classes["attentions"])


def layer_attentions(
    layers: list[nn.Module], attention_classes: tuple[type, ...]
) -> list[tuple[nn.Module, nn.Module]]:
    """Each layer with its one self-attention module, checked before anything is swapped."""
    pairs = []
    for layer in layers:
        attentions = [m for m in layer.modules() if isinstance(m, attention_classes)]
        if len(attentions) != 1:
            raise TypeError(
                f"{type(layer).__name__} should hold one self-attention, found {len(attentions)}"
            )
        hf_attention_projections(attentions[0])
        pairs.append((layer, attentions[0]))
    return pairs


def patch_layers(
    handle: TurboHandle, pairs: list[tuple[nn.Module, nn.Module]], layer_mixin: type
) -> None:
    """Swap every (layer, attention) pair from :func:`layer_attentions`."""
    for layer, attention in pairs:
        swap_hf_class(handle, layer, layer_mixin)
        swap_hf_class(handle, attention, TurboHFAttention)


@register_adapter
class HFViTAdapter(HFAdapterBase):
    """transformers ``ViTModel`` / ``ViTForImageClassification`` and the DeiT equivalents."""

    name = "hf-vit"
    model_names = ("google/vit-*", "facebook/deit-*")
    model_types = ("vit", "deit")

    classes = staticmethod(_vit_classes)

    def patch(
        self, model: nn.Module, config: TurboConfig, explicit: frozenset[str] = frozenset()
    ) -> TurboHandle:
        classes = self.classes()
        backbone = find_one(model, classes["backbones"], "ViT/DeiT backbone")
        pairs = self.layer_pairs(backbone, classes, "ViT/DeiT layers")
        embeddings = backbone.embeddings
        # CLS, plus DeiT's distillation token: both stay in front, never merged
        prefix = 1 + int(getattr(embeddings, "distillation_token", None) is not None)
        handle = make_handle(
            model, config, explicit, self.name, len(pairs), prefix_tokens=prefix, has_cls=True
        )
        swap_hf_class(handle, model, TurboHFScope)
        if backbone is not model:
            swap_hf_class(handle, backbone, TurboHFScope)
        patch_layers(handle, pairs, _TurboViTLayer)
        return handle
