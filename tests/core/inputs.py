"""Hypothesis strategies and tensor builders shared by the core property tests."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclasses.dataclass
class Case:
    x: torch.Tensor
    metric: torch.Tensor
    semantic: torch.Tensor
    r: int
    protected: int

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def tokens(self) -> int:
        return self.x.shape[1]


def make_case(
    seed: int,
    batch: int,
    tokens: int,
    width: int,
    r: int,
    protected: int,
    dtype: torch.dtype = torch.float32,
) -> Case:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=g).to(dtype)
    metric = torch.randn(batch, tokens, max(width // 2, 2), generator=g).to(dtype)
    semantic = torch.randn(batch, tokens, generator=g).softmax(dim=-1)
    return Case(x, metric, semantic, r, protected)


@st.composite
def cases(draw, dtypes=DTYPES, max_tokens: int = 40) -> Case:
    tokens = draw(st.integers(1, max_tokens))
    return make_case(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, 4)),
        tokens=tokens,
        width=draw(st.integers(1, 12)),
        # 0 up to well beyond what the sequence allows
        r=draw(st.integers(0, tokens + 3)),
        protected=draw(st.integers(0, min(tokens, 4))),
        dtype=draw(st.sampled_from(dtypes)),
    )


fusions = st.sampled_from(["difference", "division", "product", "layer_dynamic"])
modes = st.sampled_from(["turbo", "redundancy", "semantics"])
