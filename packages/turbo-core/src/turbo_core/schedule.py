"""r in one place: the forms of a schedule, the one clipping rule, and their resolution.

A schedule says how many tokens each block removes. Static forms (an int, a per-block
list, ToMe's ``(r, inflection)``) are known before the forward pass; :class:`Ratio` and
:class:`Target` depend on the token count, so every form is turned into the r each
block applies by :func:`resolve_schedule`, from the count entering the first block.
Clipping happens in :func:`max_removable` and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, TypeAlias

from ._checks import as_integer, check_float, check_int

__all__ = [
    "CountRule",
    "RClippedWarning",
    "RSpec",
    "Ratio",
    "ResolvedSchedule",
    "Target",
    "expand_r",
    "max_removable",
    "normalise_r",
    "resolve_schedule",
]


class RClippedWarning(UserWarning):
    """A block's requested r exceeded what one bipartite step allows and was clipped."""


@dataclasses.dataclass(frozen=True)
class Ratio:
    """Remove ``floor(fraction * N)`` of the ``N`` tokens entering every block (then clipped).

    The amount follows the sequence: it shrinks as tokens merge and grows with the
    input resolution (Stable Diffusion at 512 and 768 px).

    Args:
        fraction: share of the current tokens to remove, strictly between 0 and 1.
    """

    fraction: float

    def __post_init__(self) -> None:
        value = self.fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Ratio.fraction must be a number in (0, 1), got {value!r}")
        if not 0.0 < float(value) < 1.0:  # also refuses NaN
            raise ValueError(f"Ratio.fraction must be in (0, 1) (exclusive), got {value}")
        object.__setattr__(self, "fraction", float(value))

    def request(self, num_tokens: int) -> int:
        """Tokens to remove from ``num_tokens`` before clipping."""
        # The epsilon makes 0.29 of 100 tokens 29, as written, not the 28 that the
        # binary rounding of 0.29 would give; it is far below any real fractional part.
        return math.floor(self.fraction * num_tokens + 1e-9)


@dataclasses.dataclass(frozen=True)
class Target:
    """Reach ``tokens`` tokens after the last block, removing about as many in each block.

    Block ``i`` of ``L`` removes ``ceil((N_i - tokens) / (L - i))`` (at least 0), so the
    removal is spread evenly. Only where that share would leave the target out of reach
    of the later blocks' clip limits (halving is the most a block can do) does
    :func:`resolve_schedule` ask for the nearest amount that keeps it reachable. A
    target no schedule can reach is not an error: every block then asks for all the
    excess, the clip shows in :attr:`ResolvedSchedule.clipped`, and
    :attr:`ResolvedSchedule.final_tokens` says where it ended (a target above the
    input count, or below ``min_tokens``, ends above it without any clipping).

    Args:
        tokens: sequence length wanted after the last block, at least 1.
    """

    tokens: int

    def __post_init__(self) -> None:
        check_int(self.tokens, "Target.tokens", 1)

    def request(self, num_tokens: int, blocks_left: int) -> int:
        """Tokens to remove now, from ``num_tokens``, with ``blocks_left`` blocks to go."""
        excess = num_tokens - self.tokens
        return max(-(-excess // blocks_left), 0)  # ceil division on ints


@dataclasses.dataclass(frozen=True)
class CountRule:
    """An adapter's requirement on the token count after the last block.

    ``count - offset`` must be a multiple of ``multiple_of``: MiniGPT-v2 concatenates 4
    adjacent patch tokens, so with its CLS token the rule is ``CountRule(4, offset=1)``.

    Args:
        multiple_of: the required divisor, at least 1.
        offset: leading tokens not counted (CLS, registers), at least 0.
    """

    multiple_of: int
    offset: int = 0

    def __post_init__(self) -> None:
        check_int(self.multiple_of, "CountRule.multiple_of", 1)
        check_int(self.offset, "CountRule.offset", 0)

    def allows(self, count: int) -> bool:
        """Whether a sequence of ``count`` tokens satisfies the rule."""
        return count >= self.offset and (count - self.offset) % self.multiple_of == 0


#: ``r`` as users write it: tokens removed per block (int), an explicit per-block list,
#: ToMe's ``(r, inflection)`` with inflection in [-1, 1] (-1 decreasing), a float in
#: (0, 1) (shorthand for :class:`Ratio`), a :class:`Ratio` or a :class:`Target`.
RSpec: TypeAlias = int | float | Sequence[int] | tuple[int, float] | Ratio | Target

#: The normal form of ``r`` after validation (hashable, so configs stay frozen).
RNormal: TypeAlias = int | tuple[int, ...] | tuple[int, float] | Ratio | Target

_R_FORMS = (
    "an int >= 0 (tokens per block), a list of them, (r, inflection), "
    "a fraction in (0, 1), a Ratio or a Target"
)


def normalise_r(r: Any) -> RNormal:
    """Validate ``r`` (any :data:`RSpec` form) and return its hashable normal form."""
    if isinstance(r, (Ratio, Target)):
        return r
    if isinstance(r, float):
        if not 0.0 < r < 1.0:
            raise ValueError(
                f"r as a float is a fraction of the current tokens and must be in (0, 1); "
                f"for a fixed count give an int >= 0; got {r}"
            )
        return Ratio(r)
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        base = check_int(r[0], "r[0] (tokens per block)")
        inflection = check_float(r[1], "r[1] (inflection)", -1.0, 1.0)
        return (base, inflection)
    if isinstance(r, (list, tuple)):
        return tuple(check_int(v, f"r[{i}]") for i, v in enumerate(r))
    if as_integer(r) is None:  # ints, numpy integers and 0-d integer tensors pass
        raise TypeError(f"r must be {_R_FORMS}; got {r!r}")
    return check_int(r, "r")


def expand_r(r: RSpec, num_blocks: int) -> tuple[int, ...]:
    """Tokens to remove in each of ``num_blocks`` blocks, for the static forms of ``r``.

    An int is the same for every block; a list is padded with zeros (an error if
    longer than the model); ``(r, inflection)`` spreads ``num_blocks * r`` tokens
    linearly, from ``r * (1 - inflection)`` in the first block to ``r * (1 + inflection)``
    in the last (ToMe's schedule; inflection -1 decreases to zero, +1 increases).
    :class:`Ratio` and :class:`Target` depend on the token count: they raise here, use
    :func:`resolve_schedule`. Nothing is clipped here.
    """
    check_int(num_blocks, "num_blocks", 1)
    spec = normalise_r(r)
    if isinstance(spec, (Ratio, Target)):
        raise ValueError(
            f"r={spec!r} depends on the token count, so it has no static schedule; "
            "use turbo_core.resolve_schedule(r, num_tokens, num_blocks, protected=...)"
        )
    if isinstance(spec, int):
        return (spec,) * num_blocks
    if len(spec) == 2 and isinstance(spec[1], float):
        base, inflection = spec
        first = base * (1.0 - inflection)
        last = 2 * base - first
        step = (last - first) / max(num_blocks - 1, 1)
        return tuple(int(first + step * i) for i in range(num_blocks))
    per_block = tuple(int(v) for v in spec)
    if len(per_block) > num_blocks:
        raise ValueError(
            f"r lists {len(per_block)} blocks but the model has {num_blocks}; "
            f"give at most {num_blocks} values"
        )
    return per_block + (0,) * (num_blocks - len(per_block))


def max_removable(num_tokens: int, protected: int, min_tokens: int) -> int:
    """The most tokens one block may remove: THE clipping rule of the library.

    0 below the minimum-token threshold (``num_tokens < min_tokens``), else what one
    bipartite step allows: every unprotected A token merged, ``(N - protected) // 2``.
    """
    if num_tokens < min_tokens:
        return 0
    return max((num_tokens - protected) // 2, 0)


@dataclasses.dataclass(frozen=True)
class ResolvedSchedule:
    """What each block removes for one input length, and why.

    Attributes:
        r: tokens each block removes (clipped and adjusted); what bipartite matching applies.
        counts: sequence length after each block, when each block removes exactly ``r``.
        requested: what the form of ``r`` asked for in each block, before clipping and
            before any :class:`CountRule` adjustment.
        clipped: ``(block, requested, applied)`` for every block where the bipartite
            limit (not the minimum-token threshold) cut the request.
        adjusted: None when no :class:`CountRule` was given or the count already met it;
            otherwise a sentence saying how the last merging blocks were changed, or
            why no schedule within the clip limits can meet the rule.
        unadjusted: ``r`` before the rule's adjustment (None when not adjusted).
        rule: the :class:`CountRule` applied, if any.
    """

    r: tuple[int, ...]
    counts: tuple[int, ...]
    requested: tuple[int, ...]
    clipped: tuple[tuple[int, int, int], ...]
    adjusted: str | None = None
    unadjusted: tuple[int, ...] | None = None
    rule: CountRule | None = None

    @property
    def final_tokens(self) -> int:
        """Sequence length after the last block."""
        return self.counts[-1]

    @property
    def meets_rule(self) -> bool:
        """Whether the final count satisfies :attr:`rule` (True without a rule)."""
        return self.rule is None or self.rule.allows(self.final_tokens)


def resolve_schedule(
    r: RSpec,
    num_tokens: int,
    num_blocks: int,
    *,
    protected: int,
    min_tokens: int = 0,
    rule: CountRule | None = None,
    warn: bool = True,
) -> ResolvedSchedule:
    """Resolve any form of ``r`` into what each block removes, for ``num_tokens`` input tokens.

    Simulates the blocks in order (bipartite matching removes exactly the applied r):
    each block's request comes from the form of ``r`` and the count entering it, and
    is clipped by :func:`max_removable`. With a ``rule``, the last merging blocks then
    remove a few more tokens (or, if the clip limits forbid it, a few fewer) so the
    final count meets it; blocks that remove nothing are never made to merge and
    nothing is ever padded. Warns :class:`RClippedWarning` if the bipartite limit clipped.

    Args:
        r: any form :class:`~turbo_core.TurboConfig` accepts (see :data:`RSpec`).
        num_tokens: tokens entering the first block (protected ones included).
        num_blocks: blocks that reduce.
        protected: leading tokens that never merge.
        min_tokens: blocks entered with fewer tokens than this remove nothing.
        rule: optional requirement on the final count (see :class:`CountRule`).
        warn: False resolves silently (a :class:`~turbo_core.TokenReducer` says a clip
            once per setting itself).
    """
    spec = normalise_r(r)
    check_int(num_tokens, "num_tokens", 0)
    check_int(num_blocks, "num_blocks", 1)
    check_int(protected, "protected", 0)
    check_int(min_tokens, "min_tokens", 0)
    if rule is not None and not isinstance(rule, CountRule):
        raise TypeError(f"rule must be a CountRule or None, got {rule!r}")
    resolved = _resolve(spec, num_tokens, num_blocks, protected, min_tokens, rule)
    if resolved.clipped and warn:
        warnings.warn(clip_message(resolved, protected), RClippedWarning, stacklevel=2)
    return resolved


def clip_message(resolved: ResolvedSchedule, protected: int) -> str:
    """The :class:`RClippedWarning` text for a schedule that clips: its first clipped block."""
    block, requested, applied = resolved.clipped[0]
    more = len(resolved.clipped) - 1
    return (
        f"block {block}: r={requested} clipped to {applied}, the most one bipartite step "
        f"allows with {protected} protected"
        + (f" (and {more} more block(s))" if more else "")
        + "; see ResolvedSchedule.clipped"
    )


# Resolution is pure and runs once per forward pass, usually with the same arguments;
# the cache keeps a CountRule search off the per-forward cost. Warnings stay outside it.
@functools.lru_cache(maxsize=256)
def _resolve(
    spec: RNormal,
    num_tokens: int,
    num_blocks: int,
    protected: int,
    min_tokens: int,
    rule: CountRule | None,
) -> ResolvedSchedule:
    static = None if isinstance(spec, (Ratio, Target)) else expand_r(spec, num_blocks)
    target_reach = None
    if isinstance(spec, Target) and spec.tokens <= num_tokens:
        # Which counts entering each block can still end exactly on the target.
        every_block = (1,) * num_blocks
        target_reach = _reachable(every_block, spec.tokens, num_tokens, protected, min_tokens)
    applied: list[int] = []
    requested: list[int] = []
    clipped: list[tuple[int, int, int]] = []
    count = num_tokens
    for block in range(num_blocks):
        limit = max_removable(count, protected, min_tokens)
        if isinstance(spec, Ratio):
            want = spec.request(count)
        elif isinstance(spec, Target):
            want = spec.request(count, num_blocks - block)
            if target_reach is not None:
                want = _keep_target_reachable(spec, want, count, target_reach[block + 1], limit)
        else:
            assert static is not None  # every other form is static
            want = static[block]
        got = min(want, limit)
        if got < want and count >= min_tokens:  # the threshold is by design, not a clip
            clipped.append((block, want, got))
        requested.append(want)
        applied.append(got)
        count -= got
    base = tuple(applied)
    adjusted: str | None = None
    unadjusted: tuple[int, ...] | None = None
    final = base
    if rule is not None and not rule.allows(count):
        changed = _meet_rule(base, num_tokens, protected, min_tokens, rule)
        if changed is None:
            adjusted = (
                f"{rule} cannot be met: no schedule that changes only the merging blocks "
                f"within the clip limits ends on an allowed count ({count} tokens after the "
                f"last block, {num_tokens} before the first); r left as resolved"
            )
        else:
            final, unadjusted = changed, base
            adjusted = _describe(rule, base, changed, num_tokens)
    return ResolvedSchedule(
        r=final,
        counts=_counts(num_tokens, final),
        requested=tuple(requested),
        clipped=tuple(clipped),
        adjusted=adjusted,
        unadjusted=unadjusted,
        rule=rule,
    )


def _keep_target_reachable(
    target: Target, even: int, count: int, reach_after: list[bool], limit: int
) -> int:
    """The even share, or the amount nearest to it (the larger on a tie) after which the
    later blocks can still end on the target; all the excess if none can."""
    valid = [v for v in range(limit + 1) if reach_after[count - v]]
    if not valid:
        return max(count - target.tokens, 0)
    return min(valid, key=lambda v: (abs(v - even), -v))


def _counts(num_tokens: int, r: Sequence[int]) -> tuple[int, ...]:
    counts, count = [], num_tokens
    for removed in r:
        count -= removed
        counts.append(count)
    return tuple(counts)


def _meet_rule(
    base: tuple[int, ...], num_tokens: int, protected: int, min_tokens: int, rule: CountRule
) -> tuple[int, ...] | None:
    """``base`` with its last merging blocks changed so the final count meets ``rule``.

    Tries the nearest allowed count below the current final count (remove more), then
    the nearest above (remove fewer). Only blocks that merge in ``base`` may change,
    each within :func:`max_removable` of the count entering it. Returns None if no
    such schedule exists.
    """
    final = num_tokens - sum(base)
    below = final - (final - rule.offset) % rule.multiple_of
    above = below + rule.multiple_of
    merging = [i for i, v in enumerate(base) if v > 0]
    entering = (num_tokens, *_counts(num_tokens, base))  # count before block i
    for goal in (below, above):
        if not rule.allows(goal) or goal > num_tokens:
            continue
        reach = _reachable(base, goal, num_tokens, protected, min_tokens)
        # Keep as many leading blocks as they are: start changing at the latest block
        # from whose (unchanged) entering count the goal is still reachable.
        for start in reversed(merging):
            if reach[start][entering[start]]:
                return _build(base, start, entering[start], reach, protected, min_tokens)
    return None


def _reachable(
    base: tuple[int, ...], goal: int, num_tokens: int, protected: int, min_tokens: int
) -> list[list[bool]]:
    """``reach[i][c]``: from ``c`` tokens entering block ``i``, can the last block end on
    ``goal`` if merging blocks remove any amount within the limit and the others none?"""
    num_blocks = len(base)
    reach = [[False] * (num_tokens + 1) for _ in range(num_blocks + 1)]
    reach[num_blocks][goal] = True
    for i in range(num_blocks - 1, -1, -1):
        after = reach[i + 1]
        if base[i] == 0:
            reach[i] = after
            continue
        # prefix[c + 1] = how many counts <= c are reachable after block i
        prefix = [0]
        for ok in after:
            prefix.append(prefix[-1] + ok)
        here = reach[i]
        for c in range(num_tokens + 1):
            low = c - max_removable(c, protected, min_tokens)
            here[c] = prefix[c + 1] - prefix[low] > 0
    return reach


def _build(
    base: tuple[int, ...],
    start: int,
    count: int,
    reach: list[list[bool]],
    protected: int,
    min_tokens: int,
) -> tuple[int, ...]:
    """From block ``start`` on, each merging block takes the value nearest its base r
    (the larger on a tie) that keeps the goal reachable."""
    out = list(base)
    for i in range(start, len(base)):
        if base[i] == 0:
            continue
        limit = max_removable(count, protected, min_tokens)
        options = [v for v in range(limit + 1) if reach[i + 1][count - v]]
        out[i] = min(options, key=lambda v: (abs(v - base[i]), -v))
        count -= out[i]
    return tuple(out)


def _describe(
    rule: CountRule, before: tuple[int, ...], after: tuple[int, ...], num_tokens: int
) -> str:
    old_final, new_final = num_tokens - sum(before), num_tokens - sum(after)
    changes = ", ".join(
        f"block {i}: {a} -> {b}"
        for i, (a, b) in enumerate(zip(before, after, strict=True))
        if a != b
    )
    direction = "more" if new_final < old_final else "fewer"
    return (
        f"{rule}: {abs(new_final - old_final)} {direction} token(s) removed so the last block "
        f"ends on {new_final} instead of {old_final} ({changes}); r before: {list(before)}"
    )
