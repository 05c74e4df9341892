"""semantic_norm="length": the semantic value times the number of real tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from turbo_core import TurboConfig
from turbo_core.scoring import InformationScorer


def _identical_tokens(batch: int, tokens: int, width: int = 4) -> torch.Tensor:
    # every token the same: redundancy is exactly 1 everywhere, so E = 1 - w * A'
    return torch.ones(batch, tokens, width)


def test_default_is_the_reference_behaviour():
    assert TurboConfig().semantic_norm == "none"
    assert TurboConfig.from_preset("reference").semantic_norm == "none"


@pytest.mark.parametrize("value", ["Length", "mean", "", None, 1])
def test_bad_semantic_norm_names_the_parameter_and_the_choices(value):
    with pytest.raises(ValueError, match=r"semantic_norm must be one of \['none', 'length'\]"):
        TurboConfig(semantic_norm=value)


def test_length_norm_by_hand():
    # 6 tokens, A sums to 1; A tokens are positions 0, 2, 4 (position 0 protected)
    semantic = torch.tensor([[0.5, 0.1, 0.2, 0.05, 0.1, 0.05]])
    config = TurboConfig(alpha=0.5, semantic_scale=1.0, semantic_norm="length")
    scores = InformationScorer(config).score(_identical_tokens(1, 6), semantic, 1, 0)
    # E = 1 - 0.5 * 6 * A for positions 2 and 4
    expected = torch.tensor([[-torch.inf, 1 - 0.5 * 6 * 0.2, 1 - 0.5 * 6 * 0.1]])
    torch.testing.assert_close(scores.degree, expected)


def test_length_norm_counts_real_tokens_only():
    # 4 real tokens then 2 padding: the count is 4, not 6
    semantic = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False, False]])
    config = TurboConfig(alpha=1.0, semantic_scale=1.0, semantic_norm="length")
    scores = InformationScorer(config).score(_identical_tokens(1, 6), semantic, 1, 0, mask)
    assert float(scores.degree[0, 1]) == pytest.approx(1 - 4 * 0.2)


@given(
    tokens=st.integers(4, 80),
    alpha=st.floats(0.01, 3.0),
    seed=st.integers(0, 2**16),
)
def test_length_norm_equals_alpha_times_length(tokens, alpha, seed):
    # "length" at alpha is the reference at alpha * N: same degree, hence the same merges
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, tokens, 8, generator=g)
    semantic = torch.randn(2, tokens, generator=g).softmax(dim=-1)
    normed = InformationScorer(
        TurboConfig(alpha=alpha, semantic_scale=1.0, semantic_norm="length")
    ).score(metric, semantic, 1, 0)
    plain = InformationScorer(TurboConfig(alpha=alpha * tokens, semantic_scale=1.0)).score(
        metric, semantic, 1, 0
    )
    torch.testing.assert_close(normed.degree, plain.degree)
    assert torch.equal(normed.partner, plain.partner)


def test_uniform_attention_gives_the_same_degree_at_every_length():
    # the point of the option: uniform attention weighs alpha whatever N is
    config = TurboConfig(alpha=0.2, semantic_scale=1.0, semantic_norm="length")
    degrees = []
    for tokens in (10, 50, 257):
        semantic = torch.full((1, tokens), 1.0 / tokens)
        scores = InformationScorer(config).score(_identical_tokens(1, tokens), semantic, 1, 0)
        degrees.append(float(scores.degree[0, 1]))
    assert degrees == pytest.approx([0.8, 0.8, 0.8])
