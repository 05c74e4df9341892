"""Slow, obviously correct versions of the connector methods: float64 Python loops.

Written independently of turbo_core.selection: nothing here is vectorised, so a shared
indexing mistake cannot hide in both.
"""

from __future__ import annotations

import itertools
import math

import torch

Row = tuple[torch.Tensor, list[float], list[int]]  # tokens (K, D), sizes, index


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def _sorted_row(tokens: list[torch.Tensor], sizes: list[float], index: list[int]) -> Row:
    order = sorted(range(len(index)), key=lambda i: index[i])
    return (
        torch.stack([tokens[i] for i in order]),
        [sizes[i] for i in order],
        [index[i] for i in order],
    )


def turbo_row(
    x: torch.Tensor, metric: torch.Tensor, guide: torch.Tensor | None, alpha: float, budget: int
) -> Row:
    """E = R - alpha * A (A summing to N), keep the lowest E, merge into the most similar."""
    n = x.shape[0]
    total = float(guide.double().sum()) if guide is not None else 1.0
    degree = []
    for i in range(n):
        r = max(cosine(metric[i], metric[j]) for j in range(n) if j != i)
        a = 0.0 if guide is None else float(guide[i]) / total * n
        degree.append(r - alpha * a)
    keep = sorted(range(n), key=lambda i: degree[i])[:budget]
    groups: dict[int, list[int]] = {k: [k] for k in keep}
    for i in range(n):
        if i in groups:
            continue
        sims = [cosine(metric[i], metric[k]) for k in keep]
        groups[keep[sims.index(max(sims))]].append(i)
    tokens = [torch.stack([x[j].double() for j in groups[k]]).mean(0) for k in keep]
    return _sorted_row(tokens, [float(len(groups[k])) for k in keep], keep)


def visionzip_row(
    hidden: torch.Tensor,
    metric: torch.Tensor,
    guide: torch.Tensor,
    dominant: int,
    contextual: int,
) -> Row:
    """VisionZip's released algorithm, one image, read from its clip_encoder.forward.

    Dominant: top ``dominant`` by the (head-summed) CLS attention, kept in sequence order.
    Contextual: the rest in order; targets every ``max(1, M // contextual)``-th (the first
    ``contextual``); the others join the target of highest cosine (normalised keys);
    contextual token = target + mean(joined), or the target alone when none joined.
    """
    n = hidden.shape[0]
    by_attention = sorted(range(n), key=lambda i: -float(guide[i]))
    dominant_set = set(by_attention[:dominant])
    tokens = [hidden[i].double() for i in range(n) if i in dominant_set]
    index = [i for i in range(n) if i in dominant_set]
    sizes = [1.0] * len(index)
    rest = [i for i in range(n) if i not in dominant_set]
    if contextual:
        step = max(1, len(rest) // contextual)
        targets = [rest[s] for s in range(0, len(rest), step)][:contextual]
        joined: dict[int, list[int]] = {t: [] for t in targets}
        for i in rest:
            if i in joined:
                continue
            sims = [cosine(metric[i], metric[t]) for t in targets]
            joined[targets[sims.index(max(sims))]].append(i)
        for t in targets:
            extra = joined[t]
            merged = hidden[t].double()
            if extra:
                merged = merged + torch.stack([hidden[j].double() for j in extra]).mean(0)
            tokens.append(merged)
            index.append(t)
            sizes.append(1.0 + len(extra))
    return _sorted_row(tokens, sizes, index)


def divprune_picks(metric: torch.Tensor, budget: int) -> list[int]:
    """DivPrune's greedy max-min rule in float64 loops, in the order picked."""
    n = metric.shape[0]
    dist = [[1.0 - cosine(metric[i], metric[j]) for j in range(n)] for i in range(n)]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    picks = [max(range(n), key=lambda i: nearest[i])]
    while len(picks) < budget:
        left = [i for i in range(n) if i not in picks]
        picks.append(max(left, key=lambda i: min(dist[i][p] for p in picks)))
    return picks


def logdet(kernel: torch.Tensor, subset: list[int]) -> float:
    if not subset:
        return 0.0
    sub = kernel.double()[subset][:, subset]
    sign, value = torch.linalg.slogdet(sub)
    return float(value) if float(sign) > 0 else -math.inf


def dpp_greedy_slow(kernel: torch.Tensor, budget: int) -> list[int]:
    """Greedy DPP MAP without the Cholesky trick: add the item of largest log det, each step."""
    picks: list[int] = []
    for _ in range(budget):
        left = [i for i in range(kernel.shape[0]) if i not in picks]
        picks.append(max(left, key=lambda i: logdet(kernel, [*picks, i])))
    return picks


def dpp_map_brute(kernel: torch.Tensor, budget: int) -> tuple[list[int], float]:
    """The exact DPP MAP of a fixed size: log det over every subset."""
    best: tuple[list[int], float] = ([], -math.inf)
    for subset in itertools.combinations(range(kernel.shape[0]), budget):
        value = logdet(kernel, list(subset))
        if value > best[1]:
            best = (list(subset), value)
    return best


def cdpruner_kernel(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CDPruner's conditional kernel r_i cos(x_i, x_j) r_j in float64 loops (one image)."""
    n = x.shape[0]
    rel = [sum(cosine(x[i], t) for t in text) / len(text) for i in range(n)]
    low, high = min(rel), max(rel)
    rel = [(r - low + 1e-6) / (high - low) for r in rel]
    kernel = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            kernel[i, j] = rel[i] * cosine(x[i], x[j]) * rel[j]
    return kernel
