"""Token-reduction methods by name, on a transformers vision-language model, in one call.

The names are the ones the Python API uses (``turbo_core.CONNECTOR_METHODS`` for the
connector stage, :class:`~turbo_adapters.families.llava.LLMReduction` for LLM mode):

| method | stages | what runs |
|---|---|---|
| ``none`` | | the model as loaded |
| ``turbo`` | ``connector`` (default), ``llm`` | Turbo's merge at the connector / at decoder layer K |
| ``visionzip``, ``divprune``, ``cdpruner`` | ``connector`` | the connector method of that name |
| ``fastv`` | ``llm`` | prune at decoder layer K (2, FastV's) by the last token's attention |
| ``pyramiddrop`` | ``llm`` | three staged drops at a quarter, half and three quarters of the depth |
| ``sparsevlm`` | ``llm`` | text raters at 3/32, 7/32 and 16/32 of the depth, 30 % recycled |

The budget is what each image keeps: an int (tokens) or a fraction in (0, 1]. LLM-mode
methods need a fraction of the image's tokens; an int is converted with the model's
fixed image token count (``config.image_seq_length``, LLaVA-1.5) and refused where the
count varies per image. For the staged methods the budget is the first stage's keep;
PyramidDrop keeps ``budget ** (s + 1)`` after stage s (its halving ratio when budget is
0.5) and SparseVLM scales its 64-token LLaVA-1.5 schedule (66, 30, 17) to the budget.
Python, turbo-eval and the lmms-eval door (:mod:`turbo_eval.lmms`) all call these names here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .api import apply
from .connector import ConnectorReduction
from .families.llava.llm import LLMReduction
from .patch import TurboPatch

__all__ = ["VLM_METHODS", "apply_vlm_method", "default_stage"]

#: method name -> the stages the lmms door offers it at (the first is the default)
VLM_METHODS: dict[str, tuple[str, ...]] = {
    "none": (),
    "turbo": ("connector", "llm"),
    "visionzip": ("connector",),
    "divprune": ("connector",),
    "cdpruner": ("connector",),
    "fastv": ("llm",),
    "pyramiddrop": ("llm",),
    "sparsevlm": ("llm",),
}

_FASTV_LAYER = 2  # FastV's K on LLaVA-1.5
_SPARSEVLM_SHAPE = (66, 30, 17)  # its LLaVA-1.5 counts at 64 tokens: later stages scale alike


def default_stage(method: str) -> str | None:
    """The stage ``method`` runs at when none is named (None for ``"none"``)."""
    return _stages(method)[0] if _stages(method) else None


def _stages(method: str) -> tuple[str, ...]:
    if method not in VLM_METHODS:
        raise ValueError(f"method must be one of {sorted(VLM_METHODS)}, got {method!r}")
    return VLM_METHODS[method]


def _check_budget(budget: Any) -> int | float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be an int >= 1 or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget must be an int >= 1 or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be an int >= 1 or a fraction in (0, 1], got {budget!r}")
    return budget


def _fraction(model: nn.Module, budget: int | float, method: str) -> float:
    """The LLM-mode keep fraction of ``budget`` (an int needs a fixed image token count)."""
    if isinstance(budget, float):
        return budget
    per_image = getattr(model.config, "image_seq_length", None)
    if not isinstance(per_image, int) or per_image < 1:
        raise ValueError(
            f"budget for {method!r} (llm stage) must be a fraction in (0, 1] on a "
            f"{type(model).__name__}: its image token count is not fixed, got {budget!r}"
        )
    return min(1.0, budget / per_image)


def _depth_layers(
    depth: int, shares: tuple[float, ...], method: str, first: int = 0
) -> tuple[int, ...]:
    """Decoder layers at ``shares`` of ``depth``, strictly increasing, none below ``first``."""
    layers: list[int] = []
    for share in shares:
        layer = max(round(share * depth), layers[-1] + 1 if layers else first)
        layers.append(layer)
    if layers[-1] >= depth:
        raise ValueError(
            f"method {method!r} needs at least {len(shares) + 1} decoder layers, "
            f"the model has {depth}"
        )
    return tuple(layers)


def _llm_reduction(patch: TurboPatch, model: nn.Module, method: str, keep: float) -> LLMReduction:
    depth = int(getattr(patch, "num_text_layers", 0))
    first = int(getattr(patch, "first_llm_layer", 0))  # Qwen3-VL: below it, deepstack
    if method in ("fastv", "turbo"):
        layer = _depth_layers(depth, (_FASTV_LAYER / depth if depth else 1.0,), method, first)[0]
        return LLMReduction(
            layer=layer, keep=keep, method="merge" if method == "turbo" else "prune"
        )
    if method == "pyramiddrop":
        layers = _depth_layers(depth, (0.25, 0.5, 0.75), method, first)
        return LLMReduction.pyramid_drop(layers=layers, ratio=keep)
    # sparsevlm
    layers = _depth_layers(depth, (3 / 32, 7 / 32, 16 / 32), method, first)
    keeps = [keep * count / _SPARSEVLM_SHAPE[0] for count in _SPARSEVLM_SHAPE]
    return LLMReduction(
        layer=layers[0], keep=keeps[0], method="prune", rank="raters",
        stages=tuple(zip(layers[1:], keeps[1:], strict=True)), recycle=0.3,
    )  # fmt: skip


def apply_vlm_method(
    model: nn.Module,
    method: str,
    *,
    stage: str | None = None,
    budget: int | float = 0.25,
) -> TurboPatch | None:
    """Patch ``model`` so that every call reduces its image tokens with ``method``.

    Args:
        model: a transformers vision-language model a Turbo adapter supports.
        method: a name of :data:`VLM_METHODS`; ``"none"`` leaves the model alone.
        stage: where the method runs (one of ``VLM_METHODS[method]``); None for its default.
        budget: tokens each image keeps, an int >= 1 or a fraction in (0, 1].

    Returns:
        The patch (``turbo_adapters.remove(model)`` undoes it), or None for ``"none"``.

    Raises:
        ValueError: an unknown method, a stage the method does not run at, a budget out
            of range, or a model too shallow for the method's layers.
    """
    stages = _stages(method)
    if method == "none":
        if stage not in (None, "none"):
            raise ValueError(f"stage must be omitted for method 'none', got {stage!r}")
        return None
    stage = stages[0] if stage is None else stage
    if stage not in stages:
        raise ValueError(f"stage for method {method!r} must be one of {stages}, got {stage!r}")
    budget = _check_budget(budget)
    patch = apply(model)
    try:
        if stage == "connector":
            patch.connector = ConnectorReduction(budget=budget, method=method)  # type: ignore[attr-defined]
        else:
            reduction = _llm_reduction(patch, model, method, _fraction(model, budget, method))
            patch.llm = reduction  # type: ignore[attr-defined]
        patch.modes = stage  # type: ignore[attr-defined]
    except BaseException:
        patch.remove()  # a refused setting leaves the model as it was
        raise
    return patch
