"""The methods compared in every task, as Turbo config overrides."""

from __future__ import annotations

import dataclasses
from typing import Any

from .cross_modal import CROSS_MODAL, intra_method
from .model_side import MODEL_SIDE, SIDE_LABELS, split_method
from .size_bias import SIZE_BIAS, plain_method
from .suite import CROSS_METHODS, SIZE_BIAS_METHODS, Suite

__all__ = ["Cell", "cells_for", "method_overrides"]

#: Turbo settings a suite may give per model (``[[models]] min_tokens = 12``).
MODEL_TURBO_OPTIONS = ("min_tokens", "prop_attn")

LABELS = {
    "baseline": "baseline",
    "redundancy": "redundancy-only (ToMe)",
    "semantics": "semantics-only",
    "turbo": "Turbo",
    "redundancy-cross": "cross-modal redundancy-only",
    "semantics-cross": "cross-modal semantics-only",
    "turbo-cross": "cross-modal Turbo",
    "redundancy-sizebias": "redundancy-only (ToMe) + size bias downstream",
    "semantics-sizebias": "semantics-only + size bias downstream",
    "turbo-sizebias": "Turbo + size bias downstream",
    "tomesd": "tomesd",  # the peer library, on diffusion pipelines
}
#: methods with an alpha (swept over the suite's ``alpha``)
ALPHA_METHODS = ("turbo", "turbo-cross", "turbo-sizebias")


def method_overrides(
    method: str, r: int, suite: Suite, alpha: float | None = None
) -> dict[str, Any] | None:
    """Config overrides for ``method`` at ``r``; None means the unpatched dense model.

    A method stacked on a model-side step (``"turbo+int8"``, or ``"int8"`` alone) also
    names that step under :data:`~turbo_eval.model_side.MODEL_SIDE`. A cross-modal method
    (``"turbo-cross"``) is its intra-modal method's overrides plus its own name under
    :data:`~turbo_eval.cross_modal.CROSS_MODAL`; the model splits ``r`` between its
    vision and text-guided sites at equal FLOPs (:mod:`turbo_eval.cross_modal`). A
    size-bias method (``"turbo-sizebias"``) is its plain method's overrides plus
    ``size_bias = True`` (:mod:`turbo_eval.size_bias`).
    """
    base, side = split_method(method)
    if side is not None:
        if side not in SIDE_LABELS:
            raise ValueError(f"model-side step must be one of {sorted(SIDE_LABELS)}, got {side!r}")
        overrides = method_overrides(base, r, suite, alpha) or {}
        return {**overrides, MODEL_SIDE: side}
    if method == "baseline":
        return None
    if method in CROSS_METHODS:
        return {
            **(method_overrides(intra_method(method), r, suite, alpha) or {}),
            CROSS_MODAL: method,
        }
    if method in SIZE_BIAS_METHODS:
        return {**(method_overrides(plain_method(method), r, suite, alpha) or {}), SIZE_BIAS: True}
    if method == "redundancy":
        return {"r": r, "mode": "redundancy", "alpha": 0.0}
    if method == "semantics":
        return {"r": r, "mode": "semantics"}
    if method == "tomesd":  # the model runs the peer at r (pipelines: r percent merged)
        return {"r": r, "peer": "tomesd"}
    if method == "turbo":
        return {
            "r": r,
            "mode": "turbo",
            "alpha": suite.alpha[0] if alpha is None else alpha,
            "semantic_scale": suite.semantic_scale,
            "fusion": suite.fusion,
        }
    raise ValueError(f"method must be one of {sorted(LABELS)}, got {method!r}")


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
