"""Validated, immutable configuration of a token reducer, with named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import Enum
from typing import Any

from ._checks import check_float, check_int
from .schedule import RSpec, expand_r, normalise_r

__all__ = [
    "MAX_SEMANTIC_WEIGHT",
    "PRESETS",
    "SEMANTIC_NORMS",
    "Fusion",
    "Mode",
    "RSpec",
    "TurboConfig",
    "expand_r",
]


class Fusion(str, Enum):
    """How redundancy R and semantic value A fuse into the information degree E.

    ``scale`` below is ``alpha * semantic_scale``; tokens with the highest E merge first.
    """

    DIFFERENCE = "difference"  # S1: E = R - scale * A  (the paper's default)
    DIVISION = "division"  # S2: E = R / (scale * A)  (ranks exactly like R / A)
    PRODUCT = "product"  # S3: E = R * (1 - scale * A)
    LAYER_DYNAMIC = "layer_dynamic"  # S4: E = R - beta**|gamma - block| * scale * A


class Mode(str, Enum):
    """Which information the ranking uses."""

    TURBO = "turbo"  # redundancy fused with semantics (``fusion``)
    REDUNDANCY = "redundancy"  # ToMe: E = R
    SEMANTICS = "semantics"  # semantics only: E = -A


_FUSION_ALIASES = {
    "s1": Fusion.DIFFERENCE,
    "s2": Fusion.DIVISION,
    "s3": Fusion.PRODUCT,
    "s4": Fusion.LAYER_DYNAMIC,
}
_MODE_ALIASES = {
    "tome": Mode.REDUNDANCY,
    "redundancy-only": Mode.REDUNDANCY,
    "redundancy_only": Mode.REDUNDANCY,
    "semantics-only": Mode.SEMANTICS,
    "semantics_only": Mode.SEMANTICS,
}

#: Allowed ``TurboConfig.semantic_norm`` values: none (reference) or by sequence length.
SEMANTIC_NORMS = ("none", "length")

#: The largest ``alpha * semantic_scale``: beyond it the semantic term overflows even the
#: float64 the scorer widens to (weights above 1e30 already rank like semantics only).
MAX_SEMANTIC_WEIGHT = 1e300


def _parse_enum(enum_type: type[Enum], value: Any, name: str, aliases: Mapping[str, Enum]) -> Any:
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key in aliases:
            return aliases[key]
        for member in enum_type:
            if member.value == key:
                return member
    allowed = sorted([m.value for m in enum_type] + list(aliases))
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


_PROTECTED_RANGE = "protected must be None (the model's prefix tokens) or an int >= 0"


@dataclasses.dataclass(frozen=True)
class TurboConfig:
    """Everything that decides what a :class:`~turbo_core.TokenReducer` merges.

    Args:
        r: tokens removed per block: an int, a per-block list, ``(r, inflection)``
            (ToMe's schedule), a float in (0, 1) or :class:`~turbo_core.Ratio` (a share
            of the current tokens), or :class:`~turbo_core.Target` (the count after the
            last block). See :func:`~turbo_core.resolve_schedule`.
        alpha: weight of the semantic value; ``0`` is exactly redundancy-only (ToMe).
        semantic_scale: constant multiplying ``alpha``. The paper's formula is
            ``E = R - alpha * A`` (scale 1); the authors' code multiplies by 30, so
            reference ``alpha=5`` equals paper ``alpha=150``.
        fusion: S1 ``difference`` (default), S2 ``division``, S3 ``product``,
            S4 ``layer_dynamic`` (uses ``beta`` and ``gamma``).
        beta: S4's decay base.
        gamma: the block where S4's semantic weight peaks.
        mode: ``turbo``, ``redundancy`` (ToMe) or ``semantics`` (rank by -A only).
        min_tokens: no merging in a block whose input has fewer tokens than this.
        prop_attn: add ``log(size)`` to attention logits (proportional attention).
        protected: leading tokens that never merge (CLS, distillation, registers).
            None (the default) means "the model's own prefix tokens": adapters fill
            it in, and a bare :class:`~turbo_core.TokenReducer` uses 1 (see
            :attr:`protected_tokens`). An explicit int always wins over the model's.
        trace_source: track which original tokens every output token stands for.
        semantic_norm: ``"none"`` (the reference) or ``"length"``: multiply the semantic
            value by the number of (real) tokens so its mean is 1 at any length. A is a
            softmax over N tokens, so without it the same alpha weighs less as N grows.
    """

    r: Any = 0
    alpha: float = 1.0
    semantic_scale: float = 1.0
    fusion: Fusion = Fusion.DIFFERENCE
    beta: float = 1.0
    gamma: float = 0.0
    mode: Mode = Mode.TURBO
    min_tokens: int = 0
    prop_attn: bool = True
    protected: int | None = None
    trace_source: bool = False
    semantic_norm: str = "none"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise fields in place once
        set_(self, "r", normalise_r(self.r))
        set_(self, "alpha", check_float(self.alpha, "alpha", 0.0))
        set_(self, "semantic_scale", check_float(self.semantic_scale, "semantic_scale", 0.0))
        # each is finite, but their product may not be
        if self.alpha * self.semantic_scale > MAX_SEMANTIC_WEIGHT:
            raise ValueError(
                f"alpha * semantic_scale must be <= {MAX_SEMANTIC_WEIGHT:g}, got "
                f"alpha={self.alpha:g} * semantic_scale={self.semantic_scale:g}"
            )
        set_(self, "fusion", _parse_enum(Fusion, self.fusion, "fusion", _FUSION_ALIASES))
        set_(self, "beta", check_float(self.beta, "beta", 0.0))
        set_(self, "gamma", check_float(self.gamma, "gamma"))
        set_(self, "mode", _parse_enum(Mode, self.mode, "mode", _MODE_ALIASES))
        set_(self, "min_tokens", check_int(self.min_tokens, "min_tokens"))
        protected = self.protected
        if protected is not None:
            if isinstance(protected, bool) or not isinstance(protected, int):
                raise TypeError(f"{_PROTECTED_RANGE}, got {protected!r}")
            if protected < 0:
                raise ValueError(f"{_PROTECTED_RANGE}, got {protected}")
        if self.semantic_norm not in SEMANTIC_NORMS:
            raise ValueError(
                f"semantic_norm must be one of {list(SEMANTIC_NORMS)}, got {self.semantic_norm!r}"
            )
        for flag in ("prop_attn", "trace_source"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")

    @property
    def semantic_weight(self) -> float:
        """``alpha * semantic_scale``: the factor in front of A in the fusion."""
        return self.alpha * self.semantic_scale

    @property
    def uses_semantics(self) -> bool:
        """Whether the ranking needs the guide token's attention row at all."""
        if self.mode is Mode.SEMANTICS:
            return True
        return self.mode is Mode.TURBO and self.semantic_weight > 0

    @property
    def protected_tokens(self) -> int:
        """``protected`` as a count: None (not filled in by an adapter) means the CLS token."""
        return 1 if self.protected is None else self.protected

    def schedule(self, num_blocks: int) -> tuple[int, ...]:
        """Requested r of each block of a ``num_blocks``-deep model (static forms only).

        Nothing is clipped here. A :class:`~turbo_core.Ratio` or
        :class:`~turbo_core.Target` depends on the token count and raises a
        ``ValueError``: use :func:`~turbo_core.resolve_schedule` for those.
        """
        return expand_r(self.r, num_blocks)

    def replace(self, **changes: Any) -> TurboConfig:
        """A copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(
                f"unknown TurboConfig field(s) {sorted(unknown)}; "
                f"allowed: {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TurboConfig:
        """A named preset (see :data:`PRESETS`) with ``overrides`` applied."""
        key = name.strip().lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]


# The authors' code scales the semantic term by a hard-coded 30 (E = R - 30 * alpha * A).
REFERENCE_SEMANTIC_SCALE = 30.0

PRESETS: dict[str, TurboConfig] = {
    # The paper's formula as written: E = R - alpha * A, constant r.
    "paper": TurboConfig(r=16, alpha=REFERENCE_SEMANTIC_SCALE * 5, semantic_scale=1.0),
    # The reference code's conventions, per task (alpha=5 with the x30 scale).
    "reference": TurboConfig(
        r=30, alpha=5.0, semantic_scale=REFERENCE_SEMANTIC_SCALE, min_tokens=40
    ),
    "reference-blip-caption": TurboConfig(
        r=30, alpha=5.0, semantic_scale=REFERENCE_SEMANTIC_SCALE, min_tokens=40
    ),
    "reference-blip-retrieval": TurboConfig(
        r=30, alpha=5.0, semantic_scale=REFERENCE_SEMANTIC_SCALE, min_tokens=100
    ),
    "reference-blip-nlvr": TurboConfig(
        r=30, alpha=5.0, semantic_scale=REFERENCE_SEMANTIC_SCALE, min_tokens=40
    ),
    "reference-blip-vqa": TurboConfig(
        r=40, alpha=5.0, semantic_scale=REFERENCE_SEMANTIC_SCALE, min_tokens=40
    ),
    "reference-minigpt-v2": TurboConfig(r=12, alpha=5.0, semantic_scale=REFERENCE_SEMANTIC_SCALE),
    # ToMe's own setting for ViT-B/16 at 224 px, as a redundancy-only baseline.
    "tome": TurboConfig(r=13, alpha=0.0, mode=Mode.REDUNDANCY),
}
