"""A slow, obviously-correct reference for resolving r schedules (plain loops and sets).

Written from the method description and the schedule's specification, sharing no code
with turbo_core: a block entered with fewer than ``min_tokens`` tokens removes nothing,
otherwise at most ``(N - protected) // 2`` (one bipartite step); a ratio removes the
floor of its share; a target spreads the excess evenly; a count rule is met by changing
only the blocks that merge. Reachability is found by forward enumeration of every
choice, where the library searches backwards over arrays.
"""

from __future__ import annotations

import functools
from fractions import Fraction


def limit(count: int, protected: int, min_tokens: int) -> int:
    """Most tokens one block may remove, from the method description."""
    if count < min_tokens:
        return 0
    return max(0, (count - protected) // 2)


@functools.cache
def finals_from(
    free: tuple[bool, ...], block: int, count: int, protected: int, min_tokens: int
) -> frozenset[int]:
    """Every count the last block can end on, entering ``block`` with ``count`` tokens,
    when blocks marked ``free`` remove any amount within the limit and the others none."""
    if block == len(free):
        return frozenset({count})
    if not free[block]:
        return finals_from(free, block + 1, count, protected, min_tokens)
    out: set[int] = set()
    for v in range(limit(count, protected, min_tokens) + 1):
        out |= finals_from(free, block + 1, count - v, protected, min_tokens)
    return frozenset(out)


def simulate(num_tokens: int, r: list[int] | tuple[int, ...]) -> list[int]:
    counts, c = [], num_tokens
    for v in r:
        c -= v
        counts.append(c)
    return counts


def oracle_resolve(
    kind: str,
    value,
    num_tokens: int,
    num_blocks: int,
    protected: int,
    min_tokens: int,
):
    """(requested, applied, counts, clipped) without a count rule.

    ``kind`` is ``"static"`` (``value``: the requested list), ``"ratio"`` (``value``: a
    share in thousandths, so the floor is exact integer arithmetic) or ``"target"``.
    """
    requested, applied, clipped = [], [], []
    c = num_tokens
    every = (True,) * num_blocks
    for i in range(num_blocks):
        lim = limit(c, protected, min_tokens)
        if kind == "static":
            want = value[i]
        elif kind == "ratio":
            want = (value * c) // 1000
        else:
            excess = Fraction(c - value, num_blocks - i)
            even = max(0, -((-excess.numerator) // excess.denominator))  # ceil
            if value > num_tokens:
                want = even
            else:
                # nearest to the even share after which the target stays reachable
                ok = [
                    v
                    for v in range(lim + 1)
                    if value in finals_from(every, i + 1, c - v, protected, min_tokens)
                ]
                nearest = sorted(ok, key=lambda v: (abs(v - even), -v))
                want = nearest[0] if ok else max(c - value, 0)
        got = min(want, lim)
        if got < want and c >= min_tokens:
            clipped.append((i, want, got))
        requested.append(want)
        applied.append(got)
        c -= got
    return requested, applied, simulate(num_tokens, applied), clipped


def allowed(count: int, multiple_of: int, offset: int) -> bool:
    return count >= offset and (count - offset) % multiple_of == 0


def oracle_rule(
    base: list[int],
    num_tokens: int,
    protected: int,
    min_tokens: int,
    multiple_of: int,
    offset: int,
):
    """What meeting the rule must give: ``("met", None)``, ``("impossible", None)``, or
    ``(goal, first_changed_block)``: the nearest allowed count below the current final
    one if reachable, else the nearest above, reached changing the latest blocks."""
    final = num_tokens - sum(base)
    if allowed(final, multiple_of, offset):
        return "met", None
    free = tuple(v > 0 for v in base)
    reachable = finals_from(free, 0, num_tokens, protected, min_tokens)
    below = next((c for c in range(final - 1, -1, -1) if allowed(c, multiple_of, offset)), None)
    above = next(
        (c for c in range(final + 1, num_tokens + 1) if allowed(c, multiple_of, offset)), None
    )
    entering = [num_tokens, *simulate(num_tokens, base)]
    for goal in (below, above):
        if goal is None or goal not in reachable:
            continue
        starts = [
            k
            for k in range(len(base))
            if free[k] and goal in finals_from(free, k, entering[k], protected, min_tokens)
        ]
        return goal, max(starts)
    return "impossible", None
