"""Connector methods written for the tests (the stage must not care which method runs).

- ``test-first``: keeps each image's first K tokens, drops the rest (sizes 1).
- ``test-strided``: keeps K evenly spaced tokens and averages every other token into the
  nearest kept one before it (size-weighted), so sizes differ and kept positions are
  spread over the whole image (what M-RoPE positions must follow).

Both are plain loops, obviously correct, and deterministic.
"""

from __future__ import annotations

import torch

from turbo_core.connector import (
    CONNECTOR_METHODS,
    ConnectorInputs,
    ReducedTokens,
    register_connector_method,
)

FIRST = "test-first"
STRIDED = "test-strided"


def keep_first(inputs: ConnectorInputs, budget: int) -> ReducedTokens:
    batch, n, _ = inputs.features.shape
    k = min(budget, n)
    index = torch.arange(k, device=inputs.features.device).expand(batch, k)
    return ReducedTokens(inputs.features[:, :k], torch.ones(batch, k), index)


def strided_index(n: int, k: int) -> list[int]:
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if k > 1 else [0]


def keep_strided(inputs: ConnectorInputs, budget: int) -> ReducedTokens:
    batch, n, _ = inputs.features.shape
    k = min(budget, n)
    kept = strided_index(n, k)
    tokens, sizes = [], []
    for b in range(batch):
        row_tokens, row_sizes = [], []
        for j, start in enumerate(kept):
            stop = kept[j + 1] if j + 1 < len(kept) else n
            group = inputs.features[b, start:stop]  # the kept token and those after it
            row_tokens.append(group.mean(0))
            row_sizes.append(float(stop - start))
        tokens.append(torch.stack(row_tokens))
        sizes.append(torch.tensor(row_sizes))
    index = torch.tensor(kept).expand(batch, k)
    return ReducedTokens(torch.stack(tokens), torch.stack(sizes), index)


def register() -> None:
    for name, fn in ((FIRST, keep_first), (STRIDED, keep_strided)):
        if name not in CONNECTOR_METHODS:
            register_connector_method(name, fn)


register()
