"""Reduction sites: one place where a token sequence is reduced.

A site owns its reducer (config plus any user-supplied roles), the r schedule of its
blocks, where its guide row comes from, and one :class:`SiteCall` per model call.
Calls live in a context variable, never on the model: two threads, two models or a
re-entrant call each get their own, and a call's sizes leave with its output.

Data flows one way through a site::

    attention path --observe(owner, q, k)--> SiteCall.observations[owner]
    block runner   --reduce(x, owner)------> plan + merge with *that* observation

Keying observations by the attention module that made them means a block with a
second attention (cross-attention, a Q-Former) cannot overwrite them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import sys
import weakref
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any

import torch
from torch import nn

from turbo_core import (
    CountRule,
    Ratio,
    ReductionState,
    Target,
    TokenReducer,
    TurboConfig,
    guide_attention,
)

__all__ = ["GUIDES", "ROLE_NAMES", "Observation", "ReductionSite", "SiteCall"]

#: Where the guide row (the semantic value) comes from: the query of token 0 (CLS),
#: or the mean query over all tokens (models without a CLS token).
GUIDES = ("cls", "mean")
ROLE_NAMES = ("scorer", "matcher", "merger", "restorer")
_ids = itertools.count()


@dataclasses.dataclass
class Observation:
    """What one attention saw that its block needs in order to merge.

    Attributes:
        metric: ``(B, N, D)`` keys averaged over heads (the redundancy metric).
        semantic: ``(B, N)`` the guide token's attention row, or None when unused.
    """

    metric: torch.Tensor
    semantic: torch.Tensor | None


@dataclasses.dataclass
class SiteCall:
    """One model call through a site: its reducer snapshot, state and observations."""

    reducer: TokenReducer
    state: ReductionState
    observations: dict[nn.Module, Observation] = dataclasses.field(default_factory=dict)


def refuse_copy(what: str) -> TypeError:
    """The error for copying or pickling a patch or one of its parts."""
    return TypeError(
        f"{what} cannot be copied or pickled: call turbo_adapters.remove(model) first, then "
        "copy or save the model (and apply Turbo again)"
    )


class _SiteKey:
    """A site's key in :data:`_LAST_STATES`; replaced to drop the site's entries."""

    __slots__ = ("__weakref__",)


#: The state of the last finished call through every live site, in this thread/context.
#: One variable for all sites, keyed weakly: a site that is released or collected leaves
#: nothing behind in any context (a variable per site stayed in the thread's context).
_LAST_STATES: contextvars.ContextVar[Mapping[_SiteKey, ReductionState]] = contextvars.ContextVar(
    "turbo_last_states"
)


def _keep_last(key: _SiteKey, state: ReductionState) -> None:
    # a new mapping each time: a context copied into a task or thread never sees
    # another's calls (the copy shares the old mapping, not the new one)
    last: weakref.WeakKeyDictionary[_SiteKey, ReductionState] = weakref.WeakKeyDictionary(
        _LAST_STATES.get({})
    )
    last[key] = state
    _LAST_STATES.set(last)


class ReductionSite:
    """One reduced token sequence (a vision tower, a text encoder, ...).

    Args:
        name: the site's name within its patch (``"vision"``).
        config: the reducer's settings (``protected`` already filled by the adapter).
        num_blocks: blocks that reduce this sequence, in order.
        guide: ``"cls"`` or ``"mean"`` (see :data:`GUIDES`).
        roles: user-supplied ``scorer``/``matcher``/``merger``/``restorer``; kept
            across :meth:`configure`.
        rule: a count rule for the sequence after the last block (MiniGPT-v2's
            multiple of 4); the reducer adjusts the schedule and records it.
        needs_source: the site itself needs source tracking (rotary positions).
    """

    def __init__(
        self,
        name: str,
        config: TurboConfig,
        num_blocks: int,
        *,
        guide: str = "cls",
        roles: Mapping[str, Any] | None = None,
        rule: CountRule | None = None,
        needs_source: bool = False,
    ) -> None:
        if guide not in GUIDES:
            raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        unknown = set(roles or {}) - set(ROLE_NAMES)
        if unknown:
            raise TypeError(f"unknown role(s) {sorted(unknown)}; allowed: {list(ROLE_NAMES)}")
        self.name = name
        self.num_blocks = num_blocks
        self.guide = guide
        self.rule = rule
        self.needs_source = needs_source
        self._roles = {k: v for k, v in (roles or {}).items() if v is not None}
        self._call: contextvars.ContextVar[SiteCall | None] = contextvars.ContextVar(
            f"turbo_site_{name}_{next(_ids)}", default=None
        )
        self._key = _SiteKey()  # this site's entry in every context's last states
        self._released: ReductionState | None = None  # last_state after release()
        #: the patched model (weakly), set by the patch: a clip warning points at its caller
        self.model_ref: weakref.ReferenceType[Any] | None = None
        self.reducer = self._build(config)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise refuse_copy("a Turbo reduction site (part of a patch)")

    # ----------------------------------------------------------------- settings
    def _build(self, config: TurboConfig) -> TokenReducer:
        self.check(config)
        reducer = TokenReducer(config, **self._roles)
        # what calls run: with source tracking when the site needs it, built once per
        # setting so the reducer's once-per-setting warnings stay once
        self._runner = reducer
        if self.needs_source and not config.trace_source:
            self._runner = TokenReducer(config.replace(trace_source=True), **self._roles)
        return reducer

    def check(self, config: TurboConfig) -> None:
        """Refuse ``config`` if it cannot run on this site's blocks (now, not at the first call).

        A per-block r list longer than the blocks raises a ``ValueError`` naming both counts.
        """
        if not isinstance(config.r, (Ratio, Target)):  # the static forms expand now
            config.schedule(self.num_blocks)

    @property
    def config(self) -> TurboConfig:
        return self.reducer.config

    def configure(self, **changes: Any) -> None:
        """Replace config fields (validated) or roles; user roles survive every change."""
        roles = {k: changes.pop(k) for k in list(changes) if k in ROLE_NAMES}
        self._roles.update({k: v for k, v in roles.items() if v is not None})
        for name in [k for k, v in roles.items() if v is None]:
            self._roles.pop(name, None)  # role=None restores the default
        self.reducer = self._build(self.config.replace(**changes) if changes else self.config)

    @property
    def roles(self) -> dict[str, Any]:
        """The user-supplied roles (the defaults are not listed)."""
        return dict(self._roles)

    def __repr__(self) -> str:
        return f"ReductionSite({self.name!r}, blocks={self.num_blocks}, {self.config})"

    # -------------------------------------------------------------------- calls
    def current(self) -> SiteCall | None:
        """The call running through this site in this thread/context, if any."""
        return self._call.get()

    @property
    def last_state(self) -> ReductionState | None:
        """The state of the last finished call in this thread/context.

        After :meth:`release`, the releasing thread's last state, kept by the site alone.
        """
        return _LAST_STATES.get({}).get(self._key, self._released)

    def release(self) -> None:
        """Let every thread's context drop the states kept for :attr:`last_state`.

        ``patch.remove()`` calls it: no context keeps a removed patch's states (sizes,
        sources). The calling thread's last state stays readable on the site, so it
        goes when the patch object goes.
        """
        self._released = self.last_state
        self._key = _SiteKey()  # the old key dies: every context's entry for it goes

    @contextlib.contextmanager
    def scope(self, token_mask: torch.Tensor | None = None) -> Iterator[SiteCall]:
        """Enter one model call; nested entries (forward -> forward_features) share it.

        Args:
            token_mask: ``(B, N)`` bool, False at padding (text models).
        """
        active = self._call.get()
        if active is not None:
            yield active
            return
        reducer = self._runner  # a snapshot: configure() during the call changes nothing
        state = reducer.start(self.num_blocks, token_mask=token_mask, rule=self.rule)
        call = SiteCall(reducer, state)
        token = self._call.set(call)
        try:
            yield call
        finally:
            self._call.reset(token)
            _keep_last(self._key, state)

    # ------------------------------------------------------ attention -> block
    def observe(
        self,
        call: SiteCall,
        owner: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float | None = None,
    ) -> None:
        """Record what ``owner``'s block needs to merge: the metric and the guide row.

        ``q`` and ``k`` are ``(B, H, N, D)``. Nothing is computed when this block will
        not merge (r = 0, below ``min_tokens``), and the guide row only when the
        ranking uses semantics.
        """
        state, reducer = call.state, call.reducer
        self._resolve(call, k.shape[2])
        if reducer.r_now(state, k.shape[2]) == 0:
            call.observations.pop(owner, None)
            return
        semantic = None
        config = reducer.config
        if config.uses_semantics:
            guide_q = q[:, :, 0] if self.guide == "cls" else q.mean(dim=2)
            size = state.size if config.prop_attn else None
            semantic = guide_attention(
                guide_q, k, size=size, scale=scale, key_padding_mask=state.token_mask()
            )
        call.observations[owner] = Observation(k.mean(dim=1), semantic)

    def reduce(self, call: SiteCall, x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        """Merge ``x`` (B, N, C) -> (B, N - r, C) with what ``owner`` observed; advance."""
        observed = call.observations.pop(owner, None)
        state = call.state
        if observed is None:  # this block does not merge; still advance the schedule
            self._resolve(call, x.shape[1])  # resolves the schedule on block 0
            state.r_applied.append(0)
            state.token_counts.append(x.shape[1])
            state.block_index += 1
            return x
        if observed.metric.shape[:2] != x.shape[:2]:
            raise RuntimeError(
                f"{type(owner).__name__} observed {tuple(observed.metric.shape[:2])} tokens "
                f"but the block merges {tuple(x.shape[:2])}"
            )
        return call.reducer.step(x, observed.metric, state, observed.semantic)

    def _resolve(self, call: SiteCall, num_tokens: int) -> None:
        """Resolve the call's schedule at its first block; a clip is said once per setting,
        at the line that called the model (not inside Turbo, torch or the model)."""
        if call.state.resolved is not None:
            return
        resolved = call.reducer.resolve(call.state, num_tokens, warn=False)
        if resolved.clipped and not call.reducer.clip_said:  # the frame walk only then
            model = self.model_ref() if self.model_ref is not None else None
            call.reducer.warn_clipped(resolved, stacklevel=_stacklevel_of_caller(model))


# Frames of these packages run the call, never the user's line that made it.
_CALL_MACHINERY = frozenset({"turbo_core", "turbo_adapters", "torch", "accelerate", "contextlib"})


def _stacklevel_of_caller(model: Any) -> int:
    """Stack level, for the function calling this one, of the frame that called ``model``:
    the first frame outside the call machinery and outside methods of ``model``'s modules."""
    inside = {id(m) for m in model.modules()} if isinstance(model, nn.Module) else set()
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _runs_the_call(frame, inside):
        frame, level = frame.f_back, level + 1
    return level


def _runs_the_call(frame: FrameType, inside: set[int]) -> bool:
    name = frame.f_globals.get("__name__", "")
    if isinstance(name, str) and name.split(".", 1)[0] in _CALL_MACHINERY:
        return True
    owner = frame.f_locals.get("self")
    return isinstance(owner, nn.Module) and id(owner) in inside
