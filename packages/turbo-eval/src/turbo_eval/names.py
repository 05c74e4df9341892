"""The vocabulary of turbo-eval: every method name a suite may use, the one grammar that
reads a method name, the keys under which a method's overrides travel, and the checks of
names given by users (plain file names, the nearest valid name for a misspelt one).

It imports nothing of turbo-eval, so every layer can use it: the suite parser validates
against it, the method modules read it, the models layer reads the override keys.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

__all__ = [
    "ALPHA_METHODS",
    "CROSS_METHODS",
    "CROSS_MODAL",
    "CROSS_SITE",
    "FUSIONS",
    "METHODS",
    "METHODS_HINT",
    "METHOD_TABLE",
    "MODEL_SIDE",
    "MODEL_TURBO_OPTIONS",
    "PATCHING_METHODS",
    "PEER_METHODS",
    "PLAIN_NAME_HINT",
    "SIDES",
    "SIZE_BIAS",
    "SIZE_BIAS_METHODS",
    "MethodInfo",
    "all_methods",
    "intra_method",
    "is_method",
    "is_plain_name",
    "method_kind",
    "nearest",
    "partner_method",
    "plain_method",
    "split_method",
]


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """One method of the table: how reports name and draw it.

    Attributes:
        name: the suite's name.
        kind: ``"plain"`` (the intra-modal methods), ``"cross"`` (text-guided reduction at
            the FLOPs of the intra-modal method, :mod:`turbo_eval.methods.cross_modal`),
            ``"sizebias"`` (``log(size)`` in the text side's cross-attentions over the
            merged image tokens, :mod:`turbo_eval.methods.size_bias`) or ``"peer"`` (another
            library, run on diffusion pipelines only).
        label: the report's name.
        alpha: whether the suite's ``alpha`` sweeps it.
        style: the plot's (color, marker).
        config: the Turbo config overrides it sets whatever the run (``{"mode": "turbo"}``);
            None for a method that leaves the model unpatched (the baseline) and for the
            cross-modal and size-bias methods, which take their partner's.
        settings: the run's settings it reads on top (``alpha``, ``semantic_scale``,
            ``fusion``, ``semantic_norm``), in :func:`turbo_eval.methods.method_overrides`.
    """

    name: str
    kind: str
    label: str
    alpha: bool
    style: tuple[str, str]
    config: dict[str, Any] | None = None
    settings: tuple[str, ...] = ()


#: Every method, in the order tables and plots list them: the one place a method is named.
METHOD_TABLE: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo("baseline", "plain", "baseline", False, ("k", "*")),
        MethodInfo(
            "redundancy",
            "plain",
            "redundancy-only (ToMe)",
            False,
            ("tab:blue", "o"),
            {"mode": "redundancy", "alpha": 0.0},
        ),
        MethodInfo(
            "semantics", "plain", "semantics-only", False, ("tab:green", "s"), {"mode": "semantics"}
        ),
        MethodInfo(
            "turbo",
            "plain",
            "Turbo",
            True,
            ("tab:red", "D"),
            {"mode": "turbo"},
            ("alpha", "semantic_scale", "fusion", "semantic_norm"),
        ),
        MethodInfo(
            "redundancy-cross", "cross", "cross-modal redundancy-only", False, ("tab:cyan", "v")
        ),
        MethodInfo(
            "semantics-cross", "cross", "cross-modal semantics-only", False, ("tab:olive", "^")
        ),
        MethodInfo("turbo-cross", "cross", "cross-modal Turbo", True, ("tab:pink", "P")),
        MethodInfo(
            "redundancy-sizebias",
            "sizebias",
            "redundancy-only (ToMe) + size bias downstream",
            False,
            ("tab:purple", "o"),
        ),
        MethodInfo(
            "semantics-sizebias",
            "sizebias",
            "semantics-only + size bias downstream",
            False,
            ("tab:brown", "s"),
        ),
        MethodInfo(
            "turbo-sizebias", "sizebias", "Turbo + size bias downstream", True, ("tab:orange", "D")
        ),
        # the model runs the peer at r (pipelines: r percent merged)
        MethodInfo("tomesd", "peer", "tomesd", False, ("gray", "x"), {"peer": "tomesd"}),
        # peers written in turbo_adapters' diffusion families (method="todo" / "toma")
        MethodInfo("todo", "peer", "ToDo", False, ("olive", "v"), {"peer": "todo"}),
        MethodInfo("toma", "peer", "ToMA", False, ("teal", "^"), {"peer": "toma"}),
    )
}


def _of_kind(kind: str) -> tuple[str, ...]:
    return tuple(name for name, info in METHOD_TABLE.items() if info.kind == kind)


METHODS = _of_kind("plain")
#: cross-modal variants: never in the default list
CROSS_METHODS = _of_kind("cross")
#: the intra-modal methods with the size bias downstream: never in the default list
SIZE_BIAS_METHODS = _of_kind("sizebias")
#: methods with an alpha (swept over the suite's ``alpha``)
ALPHA_METHODS = tuple(name for name, info in METHOD_TABLE.items() if info.alpha)
#: methods that patch the model with Turbo (and may stack on a model-side step)
PATCHING_METHODS = METHODS[1:] + CROSS_METHODS + SIZE_BIAS_METHODS
#: peer libraries run as a method (tomesd on diffusion pipelines): never in the default
#: list, never stacked on a model-side step
PEER_METHODS = _of_kind("peer")
#: model-side steps a method may stack on (``"turbo+int8"``) or that run alone (``"int8"``)
SIDES = ("int8", "prune", "upop", "gptq")
FUSIONS = ("difference", "division", "product", "layer_dynamic")


METHODS_HINT = (
    f"a non-empty list of {list(METHODS + CROSS_METHODS + SIZE_BIAS_METHODS + PEER_METHODS)}, "
    "each (but a peer) optionally stacked on a model-side step as METHOD+SIDE, or a SIDE "
    f"alone (SIDE: {list(SIDES)})"
)


def nearest(name: str, allowed: Any) -> str:
    """``" (did you mean 'x'?)"`` for the allowed name closest to a misspelt one, else ``""``."""
    close = difflib.get_close_matches(name, [str(a) for a in allowed], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def all_methods() -> list[str]:
    """Every method name, stacked ones included (for suggestions)."""
    plain = list(dict.fromkeys(METHODS + PATCHING_METHODS + PEER_METHODS + SIDES))
    return plain + [f"{m}+{side}" for m in PATCHING_METHODS for side in SIDES]


PLAIN_NAME_HINT = "a plain name (no path separators, no '..', not starting with '.' or '~')"


def is_plain_name(name: Any) -> bool:
    """A name safe as a file or folder name: no separators, no ``..``, not absolute."""
    return (
        isinstance(name, str)
        and bool(name.strip())
        and not any(sep in name for sep in ("/", "\\", "\0"))
        and ".." not in name
        and not name.startswith(("~", "."))
        and ":" not in name  # a drive letter on Windows
    )


def is_method(method: Any) -> bool:
    """``"turbo"``, ``"turbo+int8"`` or ``"int8"``: a known method, side, or both."""
    if not isinstance(method, str):
        return False
    if method in SIDES:
        return True
    base, side = split_method(method)
    if side is None:
        return base in METHOD_TABLE
    return base in PATCHING_METHODS and side in SIDES


# ------------------------------------------------------------- override keys
#: The key under which a method's overrides name its model-side step (``"int8"`` ...).
MODEL_SIDE = "model_side"
#: The key under which a method's overrides ask for ``log(size)`` downstream.
SIZE_BIAS = "size_bias"
#: The key under which a method's overrides name its cross-modal method.
CROSS_MODAL = "cross_modal"
#: The site the adapters' ``use_cross_modal_guidance`` adds.
CROSS_SITE = "text-guided"
#: Turbo settings a suite may give per model (``[[models]] min_tokens = 12``).
MODEL_TURBO_OPTIONS = ("min_tokens", "prop_attn")


# ------------------------------------------------------------------ grammar
def split_method(method: str) -> tuple[str, str | None]:
    """``"turbo+int8"`` -> ``("turbo", "int8")``; ``"int8"`` -> ``("baseline", "int8")``."""
    if method in SIDES:
        return "baseline", method
    base, plus, side = method.partition("+")
    return base, (side if plus else None)


def intra_method(method: str) -> str:
    """``"turbo-cross"`` -> ``"turbo"``: the intra-modal method it is compared with."""
    if method not in CROSS_METHODS:
        raise ValueError(f"method must be one of {list(CROSS_METHODS)}, got {method!r}")
    return method.removesuffix("-cross")


def plain_method(method: str) -> str:
    """``"turbo-sizebias"`` -> ``"turbo"``: the same method without the bias."""
    if method not in SIZE_BIAS_METHODS:
        raise ValueError(f"method must be one of {list(SIZE_BIAS_METHODS)}, got {method!r}")
    return method.removesuffix("-sizebias")


def method_kind(method: str) -> str | None:
    """The table kind of a method, stacked on a side or not (``"turbo-cross+int8"`` ->
    ``"cross"``; ``"int8"`` alone -> ``"plain"``, the baseline's); None for an unknown name."""
    info = METHOD_TABLE.get(split_method(method)[0])
    return info.kind if info is not None else None


def partner_method(method: str) -> str | None:
    """The method a cross-modal or size-bias method is compared with, on the same side
    (``"turbo-cross+int8"`` -> ``"turbo+int8"``); None for every other method."""
    base, side = split_method(method)
    kind = method_kind(method)
    if kind == "cross":
        plain = intra_method(base)
    elif kind == "sizebias":
        plain = plain_method(base)
    else:
        return None
    return plain if side is None else f"{plain}+{side}"
