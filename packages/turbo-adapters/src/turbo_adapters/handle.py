"""TurboHandle: what `apply` returns; owns the reducer, the per-forward state and the patch."""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from turbo_core import ReductionState, TokenReducer, TurboConfig, guide_attention

__all__ = ["TurboHandle", "handle_of"]

_HANDLE_ATTR = "_turbo_handle"
_ids = itertools.count()
_PENDING = "pending_scores"


def handle_of(model: nn.Module) -> TurboHandle | None:
    """The handle patching ``model``, or None."""
    handle = getattr(model, _HANDLE_ATTR, None)
    return handle if isinstance(handle, TurboHandle) and handle.model is model else None


class TurboHandle:
    """A patched model's Turbo controls.

    Change settings at any time without re-patching: ``handle.r = 8``,
    ``handle.alpha = 2.0`` or ``handle.configure(mode="redundancy")``. After a
    forward pass, ``handle.last_state`` tells what happened (token counts per
    block, sizes, sources).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TurboConfig,
        adapter_name: str,
        num_blocks: int,
        guide: str = "cls",
    ) -> None:
        self.model = model
        self.adapter_name = adapter_name
        self.num_blocks = num_blocks
        self.guide = guide  # "cls": query of token 0; "mean": mean query (no CLS token)
        self.reducer = TokenReducer(config)
        self.last_state: ReductionState | None = None
        self._state: contextvars.ContextVar[ReductionState | None] = contextvars.ContextVar(
            f"turbo_state_{next(_ids)}", default=None
        )
        self._swapped: list[tuple[nn.Module, type]] = []

    # ----------------------------------------------------------------- settings
    @property
    def config(self) -> TurboConfig:
        return self.reducer.config

    def configure(self, **changes: Any) -> TurboHandle:
        """Replace config fields (validated); takes effect at the next forward pass."""
        self.reducer = TokenReducer(self.config.replace(**changes))
        return self

    @property
    def r(self) -> Any:
        return self.config.r

    @r.setter
    def r(self, value: Any) -> None:
        self.configure(r=value)

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.configure(alpha=value)

    def schedule(self) -> tuple[int, ...]:
        """Scheduled r of every block."""
        return self.config.schedule(self.num_blocks)

    def __repr__(self) -> str:
        return (
            f"TurboHandle(adapter={self.adapter_name!r}, blocks={self.num_blocks}, {self.config})"
        )

    # ------------------------------------------------------------ forward scope
    def current_state(self) -> ReductionState | None:
        """The state of the forward pass running in this thread/context, if any."""
        return self._state.get()

    @contextlib.contextmanager
    def forward_scope(self, token_mask: torch.Tensor | None = None) -> Iterator[ReductionState]:
        """Enter one forward pass; nested entries (forward -> forward_features) share it.

        ``token_mask`` (B, N) bool marks real tokens (False = padding) for text models.
        """
        active = self._state.get()
        if active is not None:
            yield active
            return
        state = self.reducer.start(self.num_blocks, token_mask=token_mask)
        token = self._state.set(state)
        try:
            yield state
        finally:
            self._state.reset(token)
            self.last_state = state

    # ------------------------------------------------------- attention helpers
    def attention_bias(self, state: ReductionState, dtype: torch.dtype) -> torch.Tensor | None:
        """``log(size)`` additive mask for fused attention (None before any merge)."""
        return self.reducer.attention_bias(state, dtype)

    def observe_attention(
        self,
        state: ReductionState,
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> None:
        """Record what the block needs to merge: metric and, if used, the guide row.

        ``q`` and ``k`` are ``(B, H, N, D)``. Nothing is computed when this block
        will not merge (r = 0, below ``min_tokens``), and the guide row only when
        the ranking uses semantics.
        """
        num_tokens = k.shape[2]
        if self.reducer.r_now(state, num_tokens) == 0:  # resolves the schedule at block 0
            state.extras[_PENDING] = None
            return
        metric = k.mean(dim=1)  # (B, N, D): keys averaged over heads, as in ToMe
        semantic = None
        if self.config.uses_semantics:
            guide_q = q[:, :, 0] if self.guide == "cls" else q.mean(dim=2)
            size = state.size if self.config.prop_attn else None
            semantic = guide_attention(
                guide_q, k, size=size, scale=scale, key_padding_mask=key_padding_mask
            )
        state.extras[_PENDING] = (metric, semantic)

    def step(self, x: torch.Tensor, state: ReductionState) -> torch.Tensor:
        """Merge after the attention sub-layer, with what :meth:`observe_attention` saw."""
        pending = state.extras.pop(_PENDING, None)
        if pending is None:
            # nothing to merge in this block; still advance the schedule
            state.r_applied.append(0)
            state.token_counts.append(x.shape[1])
            state.block_index += 1
            return x
        metric, semantic = pending
        return self.reducer.step(x, metric, state, semantic)

    # ----------------------------------------------------------------- patching
    def swap_class(self, module: nn.Module, mixin: type) -> None:
        """Make ``module`` an instance of ``mixin + its class`` (weights stay in place)."""
        if getattr(module, _HANDLE_ATTR, None) is not None:
            raise RuntimeError(f"{type(module).__name__} is already patched by Turbo")
        original = type(module)
        module.__class__ = _patched_class(mixin, original)
        object.__setattr__(module, _HANDLE_ATTR, self)
        self._swapped.append((module, original))

    def remove(self) -> None:
        """Undo every class swap; the model is then exactly as before patching."""
        for module, original in reversed(self._swapped):
            module.__class__ = original
            if _HANDLE_ATTR in module.__dict__:
                object.__delattr__(module, _HANDLE_ATTR)
        self._swapped.clear()

    @property
    def patched_modules(self) -> list[nn.Module]:
        return [m for m, _ in self._swapped]


_class_cache: dict[tuple[type, type], type] = {}


def _patched_class(mixin: type, original: type) -> type:
    key = (mixin, original)
    if key not in _class_cache:
        name = f"Turbo{original.__name__}"
        _class_cache[key] = type(name, (mixin, original), {"_turbo_original_class": original})
    return _class_cache[key]
