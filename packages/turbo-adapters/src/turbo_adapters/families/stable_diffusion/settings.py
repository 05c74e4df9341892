"""Settings of merge-and-restore in a diffusion UNet (what tomesd calls its arguments)."""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Collection, Mapping
from typing import Any

__all__ = ["COMPONENTS", "LEVELS", "SDSettings", "StepSelector", "with_ratio"]

#: The sub-modules of a ``BasicTransformerBlock`` that merge their input and restore
#: their output, in the order the block runs them.
COMPONENTS = ("attn1", "attn2", "ff")

#: Which denoising steps merge: None (all), step indices, or ``fn(step, timestep)``.
StepSelector = None | Collection[int] | Callable[[int, float | None], bool]


def _ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


#: The UNet resolutions, as downsampling of the latent grid (``max_downsample``'s values).
LEVELS = (1, 2, 4, 8)


def _ratio_or_levels(name: str, value: Any) -> float | Mapping[int, float]:
    """A ratio, or ``{downsampling: ratio}`` (keys 1, 2, 4, 8; ints or their strings)."""
    if not isinstance(value, Mapping):
        return _ratio(name, value)
    levels: dict[int, float] = {}
    for key, ratio in value.items():
        level = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(level, bool) or level not in LEVELS:
            raise ValueError(f"{name} keys must be downsamplings {list(LEVELS)}, got {key!r}")
        levels[level] = _ratio(f"{name}[{level}]", ratio)
    return types.MappingProxyType(levels)


def _positive(name: str, value: Any, allowed: str = ">= 1") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class SDSettings:
    """Where and how much a diffusion UNet merges.

    Args:
        ratio_attn1, ratio_attn2, ratio_ff: share of a block's tokens merged before
            self-attention, cross-attention and the feed-forward (``r = int(N * ratio)``,
            as tomesd). 0 leaves that component alone. A ratio above what the windows
            allow (``1 - 1/(sx*sy)`` on a grid the windows tile) is applied at the
            maximum and reported (a warning and ``stats.clipped``), never silently.
            One ratio for every merging resolution, or one per resolution as
            ``{downsampling: ratio}`` (``ratio_ff={4: 0.75}``: the feed-forward merges
            only in the blocks at a quarter of the latent's resolution; resolutions
            left out do not merge that component; ``max_downsample`` still bounds all).
        sx, sy: window width and height (tokens); one destination per window.
        max_downsample: merge only in blocks whose grid is at most this many times
            smaller than the latent (1: the full-resolution level only; 1, 2, 4 or 8).
        use_rand: pick each window's destination at random (seeded, see ``seed``);
            False takes the top-left token (tomesd's ``use_rand=False``).
        seed: seed of the destination choice; step ``s`` of a generation draws from
            ``seed + s``, so a generation is reproducible and batch-size independent.
        steps: merge only in these denoising steps (indices from 0, counted per
            generation), or ``fn(step, timestep) -> bool``; None merges in every step.
        text_reduce: how the per-text-token maps over the image fold into one semantic
            value: ``"max"`` or ``"mean"`` over the (non-padding, non-start) text tokens.
        cfg_halves: the batch is ``[unconditional; conditional]`` (classifier-free
            guidance): the conditional half's map drives both halves. None: known
            from the pipeline call when a pipeline is patched, else False.
        semantic_from: ``"cond"`` (conditional half's map for both halves) or
            ``"each"`` (every sample its own map) under classifier-free guidance.
        plan_from: ``"cond"``: under classifier-free guidance the conditional half's
            tokens choose one plan that both halves follow (half the matching work:
            the halves enter the first block with identical tokens and differ only by
            what the text adds later); ``"each"``: every sample its own plan (tomesd's
            way). With ``"cond"`` the semantic map is the conditional half's too.
        attn1_kv: in self-attention merge only the keys and values: every query keeps
            its own token (nothing to restore), the merged keys carry ``log(size)``
            (proportional attention, with ``prop_attn``). Off: merge the queries too
            and copy each group's output back (tomesd's way).
        method: ``"turbo"`` (window matching, merge-and-restore), or a peer written from
            its paper (:mod:`.methods`): ``"todo"`` (ToDo: self-attention over keys and
            values of a grid downsampled by ``todo_factor``, where ``ratio_attn1 > 0``;
            the other ratios are unused; on a joint attention, SD3 / FLUX, the keys and
            values are the text and the downsampled image, :mod:`.joint_todo`) or ``"toma"`` (ToMA: facility-location
            destinations, attention-weighted merge and un-merge, at the same ratios;
            it merges the queries too, whatever ``attn1_kv``).
        todo_factor: ToDo's downsampling of the grid in each direction (int >= 2).
        todo_mode: ToDo's downsampling, ``"nearest-exact"`` (the paper's) or ``"avg"``
            (refused on FLUX: an averaged token has no single rotary position).
        toma_tau: ToMA's softmax temperature over cosine similarities (> 0).
        toma_tile: ToMA's local selection: tiles of ``toma_tile x toma_tile`` tokens
            each choose their share of the destinations (int >= 1); 0 chooses them
            over the whole grid at once (the global greedy, quadratic in the tokens).
    """

    ratio_attn1: float = 0.5
    ratio_attn2: float = 0.0
    ratio_ff: float = 0.0
    sx: int = 2
    sy: int = 2
    max_downsample: int = 1
    use_rand: bool = True
    seed: int = 0
    steps: Any = None
    text_reduce: str = "max"
    cfg_halves: bool | None = None
    semantic_from: str = "cond"
    plan_from: str = "cond"
    attn1_kv: bool = False
    method: str = "turbo"
    todo_factor: int = 2
    todo_mode: str = "nearest-exact"
    toma_tau: float = 0.1
    toma_tile: int = 8

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("ratio_attn1", "ratio_attn2", "ratio_ff"):
            set_(self, name, _ratio_or_levels(name, getattr(self, name)))
        _positive("sx", self.sx)
        _positive("sy", self.sy)
        if self.max_downsample not in (1, 2, 4, 8) or isinstance(self.max_downsample, bool):
            raise ValueError(
                f"max_downsample must be one of 1, 2, 4, 8; got {self.max_downsample!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        for flag in ("use_rand", "attn1_kv"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.cfg_halves is not None and not isinstance(self.cfg_halves, bool):
            raise TypeError(f"cfg_halves must be a bool or None, got {self.cfg_halves!r}")
        if self.text_reduce not in ("max", "mean"):
            raise ValueError(f"text_reduce must be 'max' or 'mean', got {self.text_reduce!r}")
        for name in ("semantic_from", "plan_from"):
            if getattr(self, name) not in ("cond", "each"):
                raise ValueError(f"{name} must be 'cond' or 'each', got {getattr(self, name)!r}")
        if self.method not in ("turbo", "todo", "toma"):
            raise ValueError(f"method must be 'turbo', 'todo' or 'toma', got {self.method!r}")
        _positive("todo_factor", self.todo_factor)
        if self.todo_factor < 2:
            raise ValueError(f"todo_factor must be an int >= 2, got {self.todo_factor!r}")
        if self.todo_mode not in ("nearest-exact", "avg"):
            raise ValueError(f"todo_mode must be 'nearest-exact' or 'avg', got {self.todo_mode!r}")
        tile = self.toma_tile
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
            raise ValueError(f"toma_tile must be an int >= 0 (0: global selection), got {tile!r}")
        tau = self.toma_tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau < math.inf):
            raise ValueError(f"toma_tau must be a number > 0, got {tau!r}")
        steps = self.steps
        if steps is not None and not callable(steps):
            if isinstance(steps, (str, bytes)) or not isinstance(steps, Collection):
                raise TypeError(
                    "steps must be None, a collection of step indices or fn(step, timestep), "
                    f"got {steps!r}"
                )
            bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 0]
            if bad:
                raise ValueError(f"steps must hold ints >= 0, got {bad[:3]}")
            set_(self, "steps", frozenset(steps))

    @property
    def ratios(self) -> dict[str, float | Mapping[int, float]]:
        """Ratio of every component (a number or ``{downsampling: ratio}``), by sub-module."""
        return {"attn1": self.ratio_attn1, "attn2": self.ratio_attn2, "ff": self.ratio_ff}

    def ratios_at(self, downsample: int) -> dict[str, float]:
        """Every component's ratio in the blocks at ``downsample`` (0 beyond max_downsample)."""
        if downsample > self.max_downsample:
            return dict.fromkeys(COMPONENTS, 0.0)
        return {
            c: ratio.get(downsample, 0.0) if isinstance(ratio, Mapping) else ratio
            for c, ratio in self.ratios.items()
        }

    @property
    def max_ratio(self) -> float:
        """The largest ratio the windows allow on a grid they tile: ``1 - 1/(sx*sy)``."""
        return 1.0 - 1.0 / (self.sx * self.sy)

    def merges_step(self, step: int, timestep: float | None) -> bool:
        """Whether denoising step ``step`` (with this timestep) merges at all."""
        if self.steps is None:
            return True
        if callable(self.steps):
            return bool(self.steps(step, timestep))
        return step in self.steps

    @property
    def active(self) -> bool:
        """Whether any component merges."""
        return any(v > 0 for level in LEVELS for v in self.ratios_at(level).values())

    def replace(self, **changes: Any) -> SDSettings:
        """A copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(
                f"unknown Stable Diffusion setting(s) {sorted(unknown)}; "
                f"allowed: {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))


def with_ratio(
    settings: SDSettings, ratio: Any, explicit: Mapping[str, Any] = types.MappingProxyType({})
) -> dict[str, Any]:
    """tomesd's ``ratio``: the changes that give every merging component this ratio.

    tomesd applies its one ``ratio`` to each component it merges (``merge_attn``,
    ``merge_crossattn``, ``merge_mlp``). Here the components that merge in ``settings``
    (the model's defaults or a preset) take ``ratio``; with none merging, self-attention
    does (tomesd's default). ``ratio=0`` turns every component off: the model computes
    exactly what it computes unpatched. Components named in ``explicit``
    (``ratio_ff=...`` given beside ``ratio``) keep their own value.
    """
    value = _ratio("ratio", ratio)
    names = [f"ratio_{c}" for c in COMPONENTS]
    if value == 0.0:
        return {n: 0.0 for n in names if n not in explicit}
    on = [n for n in names if _merges(getattr(settings, n))] or ["ratio_attn1"]
    return {n: value for n in on if n not in explicit}


def _merges(ratio: float | Mapping[int, float]) -> bool:
    if isinstance(ratio, Mapping):
        return any(v > 0 for v in ratio.values())
    return ratio > 0
