"""A slow, obviously correct reference for one bipartite merge step (loops, float64).

For tests: turbo-core's own property tests and the conformance kit
(:mod:`turbo_adapters.testing`) compare the library's plan and merge with it, so a
third-party adapter can too. Written from the method description only, it imports
nothing from the rest of turbo_core:
A = even positions, B = odd positions; the first ``protected`` tokens never merge
and never receive a merge; every other A token i gets its best B partner by cosine
similarity; A tokens are ranked by information degree (highest first, earlier
position first on ties); the top r merge into their partner. Output: protected
tokens, then A tokens that stay, then unprotected B tokens, each in position order;
when nothing merges, the sequence keeps its order.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["Plan", "degree_of", "oracle_merge", "oracle_plan"]

#: one row's plan: the kept original positions (in output order), the merged positions,
#: and for each merged position the output slot it joins
Plan = tuple[list[int], list[int], list[int]]


def _cosine(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=False))
    nu = math.sqrt(sum(a * a for a in u)) or 1e-12
    nv = math.sqrt(sum(b * b for b in v)) or 1e-12
    return dot / (max(nu, 1e-12) * max(nv, 1e-12))


def degree_of(
    redundancy: float,
    semantic: float,
    mode: str,
    fusion: str,
    weight: float,
    beta: float,
    gamma: float,
    block: int,
) -> float:
    """Information degree of one token under ``mode`` and ``fusion`` (S1 to S4)."""
    if mode == "redundancy" or (mode == "turbo" and weight == 0):
        return redundancy
    if mode == "semantics":
        return -semantic
    if fusion == "difference":
        return redundancy - weight * semantic
    if fusion == "division":
        return redundancy / (weight * max(semantic, 1e-6))
    if fusion == "product":
        return redundancy * (1 - weight * semantic)
    decay: float = beta ** abs(gamma - block)
    return redundancy - decay * weight * semantic


def oracle_plan(
    metric: torch.Tensor,
    semantic: torch.Tensor | None,
    r: int,
    protected: int,
    mode: str = "turbo",
    fusion: str = "difference",
    weight: float = 0.0,
    beta: float = 1.0,
    gamma: float = 0.0,
    block: int = 0,
    min_tokens: int = 0,
) -> list[Plan]:
    """Per batch element: (kept, merged, into) as Python lists."""
    plans: list[Plan] = []
    for b in range(metric.shape[0]):
        m = metric[b].double().tolist()
        n = len(m)
        r_eff = 0 if n < min_tokens else max(min(r, (n - protected) // 2), 0)
        if r_eff == 0:  # nothing merges: the sequence stays exactly as it is
            plans.append((list(range(n)), [], []))
            continue
        a_pos = [i for i in range(0, n, 2)]
        b_pos = [j for j in range(1, n, 2) if j >= protected]
        candidates: list[tuple[float, int, int]] = []
        for i in a_pos:
            if i < protected:
                continue
            best_j, best_s = -1, -math.inf
            for j in b_pos:
                s = _cosine(m[i], m[j])
                if s > best_s:
                    best_j, best_s = j, s
            sem = 0.0 if semantic is None else float(semantic[b, i])
            e = degree_of(best_s, sem, mode, fusion, weight, beta, gamma, block)
            candidates.append((e, i, best_j))
        ranked = sorted(candidates, key=lambda c: (-c[0], c[1]))
        merging = ranked[:r_eff]
        merged_set = {i for _, i, _ in merging}
        kept = list(range(min(protected, n)))
        kept += [i for i in a_pos if i >= protected and i not in merged_set]
        kept += b_pos
        slot_of = {tok: k for k, tok in enumerate(kept)}
        merged = [i for _, i, _ in merging]
        into = [slot_of[j] for _, _, j in merging]
        plans.append((kept, merged, into))
    return plans


def oracle_merge(
    x: torch.Tensor, size: torch.Tensor | None, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average per output slot, float64, one token at a time."""
    kept, merged, into = plan
    x = x.double()
    size = torch.ones(x.shape[0], 1, dtype=torch.float64) if size is None else size.double()
    members: dict[int, list[int]] = {k: [tok] for k, tok in enumerate(kept)}
    for tok, slot in zip(merged, into, strict=False):
        members[slot].append(tok)
    out: list[torch.Tensor] = []
    out_size: list[float] = []
    for k in range(len(kept)):
        total = sum(float(size[t, 0]) for t in members[k])
        acc: Any = sum(size[t, 0] * x[t] for t in members[k])
        out.append(acc / total)
        out_size.append(total)
    return torch.stack(out), torch.tensor(out_size, dtype=torch.float64)[:, None]
