"""The methods compared in every task, as Turbo config overrides (read from the one method
table, :data:`~turbo_eval.names.METHOD_TABLE`), and the result cells they fill."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

from ..model_side import SIDE_LABELS
from ..names import (
    ALPHA_METHODS,
    CROSS_MODAL,
    METHOD_TABLE,
    MODEL_SIDE,
    MODEL_TURBO_OPTIONS,
    SIZE_BIAS,
    intra_method,
    plain_method,
    split_method,
)

if TYPE_CHECKING:  # the suite parser imports this module's names, not the other way
    from ..suite import Suite

__all__ = ["LABELS", "Cell", "MethodSettings", "cells_for", "method_overrides"]


#: the report's name of every method (from the one table, :data:`~turbo_eval.names.METHOD_TABLE`)
LABELS = {name: info.label for name, info in METHOD_TABLE.items()}


@dataclasses.dataclass(frozen=True)
class MethodSettings:
    """The settings a method's overrides read besides ``r`` (a :class:`~turbo_eval.suite.Suite`
    has the same fields; ``bench`` and ``tune`` build one from their flags).

    Attributes:
        alpha: the alphas; the first is used when a call gives none.
        semantic_scale, fusion: Turbo's.
        semantic_norm: Turbo's; None leaves Turbo's default.
    """

    alpha: tuple[float, ...] = (5.0,)
    semantic_scale: float = 30.0
    fusion: str = "difference"
    semantic_norm: str | None = None


class _Settings(Protocol):
    alpha: tuple[float, ...]
    semantic_scale: float
    fusion: str


def method_overrides(
    method: str, r: int, settings: _Settings, alpha: float | None = None
) -> dict[str, Any] | None:
    """Config overrides for ``method`` at ``r``; None means the unpatched dense model.

    Read from the one table, :data:`~turbo_eval.names.METHOD_TABLE`: the method's fixed
    ``config`` plus the ``settings`` (a suite, or :class:`MethodSettings`) it names.
    A method stacked on a model-side step (``"turbo+int8"``, or ``"int8"`` alone) also
    names that step under :data:`~turbo_eval.names.MODEL_SIDE`. A cross-modal method
    (``"turbo-cross"``) is its intra-modal method's overrides plus its own name under
    :data:`~turbo_eval.names.CROSS_MODAL`; the model splits ``r`` between its
    vision and text-guided sites at equal FLOPs (:mod:`turbo_eval.methods.cross_modal`). A
    size-bias method (``"turbo-sizebias"``) is its plain method's overrides plus
    ``size_bias = True`` (:mod:`turbo_eval.methods.size_bias`).
    """
    base, side = split_method(method)
    if side is not None:
        if side not in SIDE_LABELS:
            raise ValueError(f"model-side step must be one of {sorted(SIDE_LABELS)}, got {side!r}")
        overrides = method_overrides(base, r, settings, alpha) or {}
        return {**overrides, MODEL_SIDE: side}
    info = METHOD_TABLE.get(method)
    if info is None:
        raise ValueError(f"method must be one of {sorted(LABELS)}, got {method!r}")
    if info.kind == "cross":
        return {
            **(method_overrides(intra_method(method), r, settings, alpha) or {}),
            CROSS_MODAL: method,
        }
    if info.kind == "sizebias":
        plain = method_overrides(plain_method(method), r, settings, alpha) or {}
        return {**plain, SIZE_BIAS: True}
    if info.config is None:
        return None
    if not info.settings:  # a peer reads no setting: nothing to look up
        return {"r": r, **info.config}
    values = {
        "alpha": settings.alpha[0] if alpha is None else alpha,
        "semantic_scale": settings.semantic_scale,
        "fusion": settings.fusion,
        "semantic_norm": getattr(settings, "semantic_norm", None),
    }
    own = {key: values[key] for key in info.settings if values[key] is not None}
    return {"r": r, **info.config, **own}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (model, task, method, r) result cell."""

    model: str
    task: str
    method: str
    r: int
    alpha: float | None = None  # turbo only

    @property
    def key(self) -> str:
        safe = self.model.replace("/", "--")
        alpha = "" if self.alpha is None else f"__a{self.alpha:g}"
        return f"{safe}__{self.task}__{self.method}__r{self.r}{alpha}"

    @property
    def label(self) -> str:
        base, side = split_method(self.method)
        if base == "baseline":
            return LABELS["baseline"] if side is None else SIDE_LABELS[side]
        alpha = "" if self.alpha is None else f" α={self.alpha:g}"  # noqa: RUF001
        stacked = "" if side is None else f" + {SIDE_LABELS[side]}"
        return f"{LABELS[base]}{stacked}{alpha} r={self.r}"

    def overrides(self, suite: Suite) -> dict[str, Any] | None:
        """The method's config plus the model's own Turbo settings (e.g. ``min_tokens``)."""
        overrides = method_overrides(self.method, self.r, suite, self.alpha)
        if overrides is not None and split_method(self.method)[0] != "baseline":
            options = suite.model(self.model).options
            overrides.update({k: options[k] for k in MODEL_TURBO_OPTIONS if k in options})
        return overrides


def cells_for(suite: Suite, model: str, task: str) -> list[Cell]:
    """Unpatched methods once (baseline, and model-side steps alone such as ``int8``), then
    every Turbo method at every r of the model's sweep (the model's own ``methods`` when
    it lists them, else the suite's)."""
    spec = suite.model(model)
    methods = spec.methods or suite.methods
    unpatched = [m for m in methods if split_method(m)[0] == "baseline"]
    cells = [Cell(model, task, method, 0) for method in unpatched]
    for r in spec.r:
        for method in methods:
            if split_method(method)[0] in ALPHA_METHODS:
                cells += [Cell(model, task, method, r, alpha) for alpha in suite.alpha]
            elif method not in unpatched:
                cells.append(Cell(model, task, method, r))
    return cells
