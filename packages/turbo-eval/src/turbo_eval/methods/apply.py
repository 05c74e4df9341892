"""Patching a loaded model for one method's overrides (:func:`apply_method`), the one place
a method is applied: plain methods through the model, cross-modal and size-bias methods
through :mod:`~turbo_eval.methods.cross_modal` and :mod:`~turbo_eval.methods.size_bias`."""

from __future__ import annotations

from typing import Any

from ..loaded_model import LoadedModel
from ..names import CROSS_MODAL, CROSS_SITE, SIZE_BIAS
from ..vl import VLModel
from .cross_modal import set_cross_method
from .size_bias import apply_size_bias

__all__ = ["apply_method"]


def apply_method(model: LoadedModel, overrides: dict[str, Any] | None) -> None:
    """Patch ``model`` for one method's overrides (:func:`method_overrides`); None unpatches.

    A plain method (Turbo, ToMe, semantics-only, on a model-side step or not) is the
    model's own :meth:`~turbo_eval.loaded_model.LoadedModel.set_method`. A vision-language
    model also takes the cross-modal methods (the text-guided site added at the FLOPs of
    the intra-modal method, :mod:`turbo_eval.methods.cross_modal`) and the size-bias ones (the
    adapter's ``log(size)`` in the cross-attentions over the image,
    :mod:`turbo_eval.methods.size_bias`); a method runs with exactly its own sites and options.
    """
    if not isinstance(model, VLModel):
        model.set_method(overrides)
        return
    overrides = None if overrides is None else dict(overrides)
    cross = overrides.pop(CROSS_MODAL, None) if overrides else None
    bias = bool(overrides.pop(SIZE_BIAS, False)) if overrides else False
    if bias and cross is not None:
        raise ValueError(f"model {model.name!r}: a method is cross-modal or size-biased, not both")
    handle = model.handle
    if handle is not None and (
        (CROSS_SITE in handle.sites) != (cross is not None)
        or (handle is model._biased) != bias  # the bias comes off with the patch only
    ):
        handle.remove()
        model.handle = None
    model.cross_split = None
    if cross is not None and overrides:
        model.cross_split = set_cross_method(model, overrides, cross).as_dict()
    else:  # the base class's: VLModel.set_method would drop a size-biased patch
        LoadedModel.set_method(model, overrides)
    model.settle_family_options()
    if bias and model.handle is not None and model.handle is not model._biased:
        apply_size_bias(model.handle, model.name, type(model.module).__name__)
        model._biased = model.handle
