"""Cross-modal (text-guided) reduction as a method, at the FLOPs of intra-modal Turbo.

A cross-modal method at r (``"turbo-cross"``; ``"redundancy-cross"`` and
``"semantics-cross"`` are its controls) runs the model with two reduction sites: the
vision tower's own (CLS-guided, as the intra-modal method) with a smaller ``r_v`` per
block, and the adapter's ``"text-guided"`` site, which removes ``R`` image tokens once,
between the vision encoder and the cross-attention layers, ranked by the text's
attention over the image at the first cross-attention (BLIP:
:func:`turbo_adapters.families.blip.use_cross_modal_guidance`). Both sites use the
method's mode, alpha and fusion. ``(r_v, R)`` is chosen so that one call of the task's
timed call (the ``generate`` of a VQA answer, the ITM forward) costs the FLOPs of the
intra-modal method at the same r; the cell then differs from that method only in where
the tokens go and what ranks them.

How the split is found: measured, not modelled. FLOPs come from
:func:`turbo_eval.measure.count_flops` on the model's timed call over a probe batch (the
task's first two speed items, :meth:`~turbo_eval.vl.model.VLModel.set_flops_probe`):

1. the target: the intra-modal method at r, the vision site alone;
2. ``r_v``: the smallest vision r (from ``round(cross_vision_share * r)``, default 0, up
   to r) at which the text-guided site, removing as many tokens as one bipartite step
   allows, brings the call down to the target (bisection: a larger ``r_v`` costs less);
   so the text-guided site does as much of the reduction as equal FLOPs permit;
3. ``R``: the text-guided count whose FLOPs are closest to the target (interpolation
   search over the integers; FLOPs fall with every removed token).

The ranking itself (one query/key projection and the bipartite scores) is counted, so
it is paid for with tokens. A split is searched once per (r, method settings, probe)
and kept on the model. Model options: ``cross_reduce`` (``"merge"``, the default, or
``"prune"``) and ``cross_vision_share`` (a number in [0, 1]: the least share of r kept
at the vision site).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..loaded_model import LoadedModel
from ..measure import count_flops
from ..names import CROSS_MODAL, CROSS_SITE, MODEL_SIDE, intra_method
from ..vl.catalog import vl_architecture

__all__ = [
    "CROSS_MODAL",
    "CROSS_SITE",
    "GUIDED_ARCHITECTURES",
    "CrossSplit",
    "cross_modal_problem",
    "guidance_function",
    "intra_method",
    "set_cross_method",
]

log = logging.getLogger(__name__)

#: Model classes whose text side cross-attends to the image tokens, and their adapter.
GUIDED_ARCHITECTURES = {
    "BlipForImageTextRetrieval": "hf-blip",
    "BlipForQuestionAnswering": "hf-blip",
    "Blip2ForConditionalGeneration": "hf-blip2",
    "Blip2ForImageTextRetrieval": "hf-blip2",
    "InstructBlipForConditionalGeneration": "hf-instructblip",
}
#: Where each adapter's ``use_cross_modal_guidance(patch, r, *, reduce, **changes)`` lives.
_GUIDANCE_MODULES = {
    "hf-blip": "turbo_adapters.families.blip",
    "hf-blip2": "turbo_adapters.families.blip2",
    "hf-instructblip": "turbo_adapters.families.blip2",
}
REDUCTIONS = ("merge", "prune")
_UNBOUNDED = 1 << 20  # a text-guided r that one bipartite step always clips
#: config fields of the vision site that do not apply to the one text-guided step
_VISION_ONLY = ("min_tokens",)


def guidance_function(adapter: str) -> Callable[..., Any] | None:
    """The adapter's ``use_cross_modal_guidance``, or None when it has none."""
    module = _GUIDANCE_MODULES.get(adapter)
    if module is None:
        return None
    try:
        return getattr(importlib.import_module(module), "use_cross_modal_guidance", None)
    except ImportError:
        return None


def cross_modal_problem(name: str) -> str | None:
    """Why the suite's model ``name`` cannot run a cross-modal method (None: it can)."""
    architecture = vl_architecture(name)
    if architecture is None:
        return "it is not a vision-language model with a text side over the image"
    adapter = GUIDED_ARCHITECTURES.get(architecture)
    if adapter is None:
        return (
            f"{architecture} has no text encoder that cross-attends to the image tokens "
            f"(cross-modal guidance needs one of {sorted(GUIDED_ARCHITECTURES)})"
        )
    if guidance_function(adapter) is None:
        return f"turbo-adapters' {adapter} adapter has no use_cross_modal_guidance"
    return None


@dataclasses.dataclass(frozen=True)
class CrossSplit:
    """How a cross-modal cell at ``r`` spends its reduction.

    Attributes:
        r: the intra-modal r it matches.
        vision_r: tokens the vision site removes per block.
        text_r: tokens the text-guided site removes (requested; it applies what one
            bipartite step allows).
        target_flops: FLOPs of one timed call of the intra-modal method at r (probe).
        flops: FLOPs of one timed call with this split (probe).
        reduce: ``"merge"`` or ``"prune"``.
        probe_items: items in the probe batch.
    """

    r: int
    vision_r: int
    text_r: int
    target_flops: int | None
    flops: int | None
    reduce: str
    probe_items: int

    @property
    def flops_error(self) -> float | None:
        """``flops / target_flops - 1`` (None at r = 0, where nothing is counted)."""
        if not self.target_flops or self.flops is None:
            return None
        return self.flops / self.target_flops - 1

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flops_error": self.flops_error}


# ------------------------------------------------------------------ configuring
def _text_fields(overrides: dict[str, Any], text_r: int) -> dict[str, Any]:

    fields = {k: v for k, v in overrides.items() if k != MODEL_SIDE and k not in _VISION_ONLY}
    return {**fields, "r": text_r, "min_tokens": 0}


def _add_text_site(model: LoadedModel, method: str, reduce: str) -> None:
    handle = model.handle
    assert handle is not None
    guide = guidance_function(handle.adapter_name)
    where = f"model {model.name!r} ({type(model.module).__name__}, adapter {handle.adapter_name})"
    if guide is None:
        raise TypeError(f"method {method!r} needs a text-guided reduction site; {where} has none")
    try:
        guide(handle, 0, reduce=reduce)
    except TypeError as error:
        raise TypeError(
            f"method {method!r} needs a text-guided reduction site; {where}: {error}"
        ) from error


def _configure(
    model: LoadedModel,
    overrides: dict[str, Any],
    method: str,
    reduce: str,
    vision_r: int,
    text_r: int,
) -> None:
    """The model patched with the vision site at ``vision_r`` and the text site at ``text_r``."""
    LoadedModel.set_method(model, {**overrides, "r": vision_r})  # every site, then the text one
    handle = model.handle
    assert handle is not None
    if CROSS_SITE not in handle.sites:
        _add_text_site(model, method, reduce)
    handle.configure(site=CROSS_SITE, **_text_fields(overrides, text_r))


# ----------------------------------------------------------------------- search
#: Model options the cross-modal methods read (see :func:`_options`).
CROSS_OPTIONS = ("cross_reduce", "cross_vision_share")


def _options(model: LoadedModel) -> tuple[str, float]:
    """``cross_reduce`` and ``cross_vision_share`` (checked when the model loads)."""
    options = model.options
    return str(options.get("cross_reduce", "merge")), float(options.get("cross_vision_share", 0))


class _Search:
    """FLOPs of one probe call for (vision r, text r), each counted once."""

    def __init__(
        self, model: Any, overrides: dict[str, Any], method: str, reduce: str, probe: Any
    ) -> None:
        self.model, self.overrides, self.method, self.reduce = model, overrides, method, reduce
        self.probe = probe
        self.seen: dict[tuple[int, int], tuple[int, int]] = {}  # -> (flops, text r applied)

    def count(self) -> int:
        model = self.model
        with torch.inference_mode():
            return count_flops(model.forward_features, model.module, self.probe, model.handle)

    def target(self) -> int:
        """The intra-modal method at r: the vision site alone."""
        if self.model.handle is not None:
            self.model.handle.remove()
            self.model.handle = None
        LoadedModel.set_method(self.model, self.overrides)
        return self.count()

    def __call__(self, vision_r: int, text_r: int) -> tuple[int, int]:
        """``(flops, tokens the text site removed)``."""
        key = (vision_r, text_r)
        if key not in self.seen:
            model = self.model
            _configure(model, self.overrides, self.method, self.reduce, vision_r, text_r)
            with warnings.catch_warnings():  # asking for more than one step allows is the point
                warnings.filterwarnings("ignore", message=r".*clipped to")
                flops = self.count()
            state = model.handle.sites[CROSS_SITE].last_state
            applied = sum(state.r_applied) if state is not None else 0
            self.seen[key] = (flops, applied)
        return self.seen[key]


def _search_split(model: Any, overrides: dict[str, Any], method: str) -> CrossSplit:
    reduce, share = _options(model)
    r = overrides.get("r")
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"method {method!r} needs r as an int (tokens per block), got {r!r}")
    items = len(model.flops_probe_items())
    if r == 0:
        return CrossSplit(0, 0, 0, None, None, reduce, items)
    search = _Search(model, overrides, method, reduce, model.probe_inputs())
    target = search.target()

    def most(vision_r: int) -> tuple[int, int]:  # the text site removing all it can
        return search(vision_r, _UNBOUNDED)

    low, high = min(round(share * r), r), r
    if most(high)[0] > target:
        # even at r_v = r the ranking costs more than one step saves (tiny models)
        vision_r = r
        log.warning("%s at r=%d: no split reaches the intra-modal FLOPs", method, r)
    elif most(low)[0] <= target:
        vision_r = low
    else:  # most(low) > target >= most(high): the smallest feasible r_v
        while high - low > 1:
            middle = (low + high) // 2
            if most(middle)[0] <= target:
                high = middle
            else:
                low = middle
        vision_r = high
    flops_max, text_max = most(vision_r)
    text_r, flops = _closest(lambda t: search(vision_r, t)[0], target, text_max, flops_max)
    return CrossSplit(r, vision_r, text_r, target, flops, reduce, items)


def _closest(
    flops_at: Callable[[int], int], target: int, top: int, flops_top: int
) -> tuple[int, int]:
    """The count in ``[0, top]`` whose FLOPs are closest to ``target`` (FLOPs fall with it).

    Interpolation between a bracket ``lo`` (above the target) and ``hi`` (at or below),
    bisecting once the same end has moved three times in a row.
    """
    lo, f_lo = 0, flops_at(0)
    if f_lo <= target or top == 0:
        return 0, f_lo
    hi, f_hi = top, flops_top
    if f_hi > target:
        return hi, f_hi
    last: bool | None = None  # which end moved last (True: lo)
    repeats = 0
    while hi - lo > 1:
        if repeats >= 2:
            guess = (lo + hi) // 2
        else:
            guess = lo + round((f_lo - target) * (hi - lo) / (f_lo - f_hi))
        guess = min(max(guess, lo + 1), hi - 1)
        f = flops_at(guess)
        above = f > target
        if above:
            lo, f_lo = guess, f
        else:
            hi, f_hi = guess, f
        repeats = repeats + 1 if above == last else 0
        last = above
    return (lo, f_lo) if f_lo - target < target - f_hi else (hi, f_hi)


# ------------------------------------------------------------------------ entry
def set_cross_method(model: Any, overrides: dict[str, Any], method: str) -> CrossSplit:
    """Patch ``model`` (a :class:`~turbo_eval.vl.model.VLModel`) for a cross-modal method.

    Args:
        overrides: the intra-modal method's overrides at r (``r``, ``mode``, ``alpha`` ...;
            a model-side step under ``model_side``).
        method: ``"turbo-cross"``, ``"redundancy-cross"`` or ``"semantics-cross"``.

    Returns:
        the split in use (searched on first use, then kept on the model).

    Raises:
        TypeError: the model has no text-guided site (the error names model and method).
    """
    intra_method(method)
    reduce, _ = _options(model)
    key = json.dumps(
        [method, overrides, model.speed_purpose, model.speed_tokens], sort_keys=True, default=str
    )
    split = model.cross_splits.get(key)
    if split is None:
        split = _search_split(model, overrides, method)
        model.cross_splits[key] = split
    _configure(model, overrides, method, reduce, split.vision_r, split.text_r)
    return split
