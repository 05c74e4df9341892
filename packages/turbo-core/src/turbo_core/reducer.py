"""TokenReducer: scorer + matcher + merger + restorer, driven by a per-forward state."""

from __future__ import annotations

import sys
import warnings
from types import FrameType
from typing import Any

import torch

from .attention import size_log_bias
from .config import TurboConfig
from .matching import BipartiteMatcher, Matcher
from .merging import Merger, SizeWeightedMerger, merge_sources
from .plan import MergePlan
from .restoring import CopyRestorer, Restorer
from .schedule import CountRule, RClippedWarning, ResolvedSchedule, clip_message, max_removable
from .scoring import InformationScorer, Scorer
from .state import ReductionState

# RClippedWarning lives in .schedule; it is re-exported here for older imports.
__all__ = ["RClippedWarning", "TokenReducer"]


def _check_sequence(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(
            f"{name} must be 3-D (batch, tokens, channels), got shape {tuple(t.shape)}"
        )


def _stacklevel_outside_core() -> int:
    """Stack level, for the function calling this one, of the first frame outside turbo_core."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _in_core(frame):
        frame, level = frame.f_back, level + 1
    return level


def _in_core(frame: FrameType) -> bool:
    name = frame.f_globals.get("__name__", "")
    return isinstance(name, str) and name.split(".", 1)[0] == __name__.split(".", 1)[0]


class TokenReducer:
    """Shortens a token sequence block by block (Turbo, or ToMe with ``alpha=0``).

    Typical use inside a transformer block (after attention, before the MLP)::

        state = reducer.start(num_blocks=len(blocks))   # once per forward pass
        reducer.resolve(state, x.shape[1])               # optional: step does it too
        ...
        x = x + attn(norm1(x), attn_mask=reducer.attention_bias(state, x.dtype))
        x = reducer.step(x, metric=k.mean(1), state=state, semantic=cls_row)
        x = x + mlp(norm2(x))

    Each role is replaceable: pass any object with the protocol's method as
    ``scorer``, ``matcher``, ``merger`` or ``restorer``.
    """

    def __init__(
        self,
        config: TurboConfig | None = None,
        *,
        scorer: Scorer | None = None,
        matcher: Matcher | None = None,
        merger: Merger | None = None,
        restorer: Restorer | None = None,
        **overrides: Any,
    ) -> None:
        config = config or TurboConfig()
        self.config = config.replace(**overrides) if overrides else config
        self.scorer = scorer if scorer is not None else InformationScorer(self.config)
        self.matcher = matcher if matcher is not None else BipartiteMatcher()
        self.merger = merger if merger is not None else SizeWeightedMerger()
        self.restorer = restorer if restorer is not None else CopyRestorer()
        # a reducer is one setting: its clipped schedule is said once, not every forward
        self._clip_said = False

    def __repr__(self) -> str:
        return f"TokenReducer({self.config})"

    def start(
        self,
        num_blocks: int,
        token_mask: torch.Tensor | None = None,
        rule: CountRule | None = None,
    ) -> ReductionState:
        """A fresh state for one forward pass through ``num_blocks`` blocks.

        The r schedule is not resolved yet: that needs the token count, which the
        first :meth:`step` (or :meth:`resolve`, :meth:`r_now`) supplies.

        Args:
            num_blocks: blocks that reduce (for the r schedule), at least 1.
            token_mask: optional ``(B, N)`` bool, False at padding. Padding gets size 0:
                proportional attention then masks it (log 0 = -inf), size-weighted
                averages ignore it, and it never merges with real tokens.
            rule: the adapter's requirement on the count after the last block.
        """
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if rule is not None and not isinstance(rule, CountRule):
            raise TypeError(f"rule must be a CountRule or None, got {rule!r}")
        state = ReductionState(num_blocks=num_blocks, rule=rule)
        if token_mask is not None:
            if token_mask.dim() != 2 or token_mask.dtype != torch.bool:
                raise ValueError(
                    f"token_mask must be a (B, N) bool tensor, got {token_mask.dtype} "
                    f"of shape {tuple(token_mask.shape)}"
                )
            state.size = token_mask.to(torch.float32).unsqueeze(-1)
            state.padded = True
        return state

    def resolve(
        self, state: ReductionState, num_tokens: int, *, warn: bool = True
    ) -> ResolvedSchedule:
        """Resolve ``state``'s schedule for ``num_tokens`` tokens entering the first block.

        Idempotent (the first resolution stays). Adapters may call it before the first
        block, where they know the count; :meth:`step` otherwise does it from ``x``.
        A schedule that clips warns :class:`~turbo_core.RClippedWarning` once per reducer,
        at the first caller outside turbo_core; ``warn=False`` leaves that to the caller
        (:meth:`warn_clipped`, with its own stack level).
        """
        fresh = state.resolved is None
        resolved = state.resolve(
            self.config.r,
            int(num_tokens),  # a traced (symbolic) shape becomes the concrete count
            protected=self.config.protected_tokens,
            min_tokens=self.config.min_tokens,
        )
        if fresh and warn and resolved.clipped:
            self.warn_clipped(resolved, stacklevel=_stacklevel_outside_core())
        return resolved

    @property
    def clip_said(self) -> bool:
        """Whether this reducer has warned about a clipped schedule (it does so once)."""
        return self._clip_said

    def warn_clipped(self, resolved: ResolvedSchedule, *, stacklevel: int = 1) -> bool:
        """Warn that ``resolved`` clips, unless it does not or this reducer said so already.

        Args:
            resolved: a schedule this reducer resolved.
            stacklevel: as for :func:`warnings.warn`, counted from the caller of this method.

        Returns:
            Whether it warned.
        """
        if not resolved.clipped or self._clip_said:
            return False
        self._clip_said = True
        message = clip_message(resolved, self.config.protected_tokens)
        warnings.warn(message, RClippedWarning, stacklevel=stacklevel + 1)
        return True

    def r_now(self, state: ReductionState, num_tokens: int) -> int:
        """Tokens the current block removes from ``num_tokens`` (0 past the schedule's end).

        Resolves the schedule first if needed. Equal to the resolved r whenever the
        sequence has the simulated length; this is what :meth:`step` will apply.
        """
        self.resolve(state, num_tokens)
        return self.effective_r(num_tokens, state.r_for_current_block())

    def effective_r(self, num_tokens: int, r: int) -> int:
        """``r`` clipped by :func:`~turbo_core.max_removable` with this config."""
        limit = max_removable(num_tokens, self.config.protected_tokens, self.config.min_tokens)
        return max(min(r, limit), 0)

    def plan(
        self,
        metric: torch.Tensor,
        semantic: torch.Tensor | None = None,
        r: int = 0,
        block_index: int = 0,
        token_mask: torch.Tensor | None = None,
    ) -> MergePlan:
        """Plan removing up to ``r`` tokens from a sequence with this ``metric``.

        Args:
            metric: ``(B, N, D)`` similarity features (e.g. keys averaged over heads).
            semantic: ``(B, N)`` attention of the guide token to every token.
            r: tokens to remove; clipped by :func:`~turbo_core.max_removable`.
            block_index: position of the block (used by the S4 fusion).
            token_mask: ``(B, N)`` bool, False at padding (see :meth:`start`).
        """
        _check_sequence("metric", metric)
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be an int >= 0, got {r!r}")
        batch, num_tokens = metric.shape[:2]
        if semantic is not None and semantic.shape != (batch, num_tokens):
            raise ValueError(
                f"semantic must have shape (B, N) = {(batch, num_tokens)} to match metric, "
                f"got {tuple(semantic.shape)}"
            )
        r = self.effective_r(num_tokens, r)  # the one clipping rule, via max_removable
        if r == 0:
            return MergePlan.identity(batch, num_tokens, metric.device)
        if token_mask is not None and token_mask.shape != (batch, num_tokens):
            raise ValueError(
                f"token_mask must have shape (B, N) = {(batch, num_tokens)}, "
                f"got {tuple(token_mask.shape)}"
            )
        scores = self.scorer.score(
            metric, semantic, self.config.protected_tokens, block_index, token_mask=token_mask
        )
        return self.matcher.match(scores, r)

    def merge(
        self, x: torch.Tensor, plan: MergePlan, state: ReductionState | None = None
    ) -> torch.Tensor:
        """Apply ``plan`` to ``x``; with a state, also carry its sizes and sources."""
        _check_sequence("x", x)
        if x.shape[:2] != (plan.batch_size, plan.num_tokens):
            raise ValueError(
                f"x has (B, N) = {tuple(x.shape[:2])} but the plan was made for "
                f"{(plan.batch_size, plan.num_tokens)}"
            )
        if state is None:
            return self.merger.merge(x, plan)[0]
        if state.size is not None and state.size.shape[1] != plan.num_tokens:
            raise ValueError(
                f"state tracks {state.size.shape[1]} tokens but the plan is for {plan.num_tokens}"
            )
        if self.config.trace_source and state.source is None:
            state.source = torch.arange(plan.num_tokens, device=x.device).expand(x.shape[0], -1)
        x, state.size = self.merger.merge(x, plan, state.size)
        if self.config.trace_source and plan.r:
            state.source = merge_sources(state.source, plan)
        return x

    def step(
        self,
        x: torch.Tensor,
        metric: torch.Tensor,
        state: ReductionState,
        semantic: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One block's reduction: plan with the resolved r, merge, advance the state.

        The first call resolves the schedule from ``x.shape[1]`` unless it already is.

        Args:
            x: ``(B, N, C)`` hidden states.
            metric: ``(B, N, D)`` similarity features for the same tokens.
            state: this forward pass's state (from :meth:`start`).
            semantic: ``(B, N)`` guide-token attention, needed unless redundancy-only.
        """
        _check_sequence("x", x)
        _check_sequence("metric", metric)
        if metric.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"metric has (B, N) = {tuple(metric.shape[:2])} but x has {tuple(x.shape[:2])}"
            )
        self.resolve(state, x.shape[1])
        scheduled = state.r_for_current_block()
        plan = self.plan(metric, semantic, scheduled, state.block_index, state.token_mask())
        # The resolved r already fits the simulated lengths; this only fires when the
        # sequence differs from the simulation (a matcher removing fewer, say).
        if plan.r < scheduled and x.shape[1] >= self.config.min_tokens:
            warnings.warn(
                f"block {state.block_index}: r={scheduled} clipped to {plan.r}, the most one "
                f"bipartite step allows for {x.shape[1]} tokens with "
                f"{self.config.protected_tokens} protected; see state.r_applied",
                RClippedWarning,
                stacklevel=2,
            )
        x = self.merge(x, plan, state)
        state.r_applied.append(plan.r)
        state.token_counts.append(x.shape[1])
        state.block_index += 1
        return x

    def restore(self, y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
        """Back to the plan's input length and order (merge-and-restore)."""
        return self.restorer.restore(y, plan)

    def attention_bias(self, state: ReductionState, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive SDPA mask: ``log(size)`` (proportional attention), or None before any merge.

        With ``prop_attn=False`` only padding is masked (``-inf``), if there is any.
        """
        if state.size is None:
            return None
        if self.config.prop_attn:
            return size_log_bias(state.size, dtype)
        if state.padded:
            return size_log_bias((state.size > 0).to(state.size.dtype), dtype)
        return None
