"""Informativity measures against loop versions."""

from __future__ import annotations

import math

import pytest
import torch

from turbo_core import attention_concentration, attention_entropy, token_redundancy


def test_token_redundancy_matches_loop():
    x = torch.randn(2, 7, 5)
    expected = []
    for b in range(2):
        best = []
        for i in range(7):
            best.append(
                max(
                    float(torch.cosine_similarity(x[b, i], x[b, j], dim=0))
                    for j in range(7)
                    if j != i
                )
            )
        expected.append(sum(best) / 7)
    torch.testing.assert_close(token_redundancy(x), torch.tensor(expected))


def test_repeated_tokens_are_fully_redundant():
    x = torch.randn(1, 1, 6).repeat(1, 5, 1)
    torch.testing.assert_close(token_redundancy(x), torch.ones(1))


def test_concentration_and_entropy_extremes():
    uniform = torch.full((1, 10), 0.1)
    peaked = torch.zeros(1, 10)
    peaked[0, 3] = 1.0
    torch.testing.assert_close(attention_concentration(uniform, 0.2), torch.tensor([0.2]))
    torch.testing.assert_close(attention_concentration(peaked, 0.2), torch.tensor([1.0]))
    torch.testing.assert_close(attention_entropy(uniform), torch.tensor([1.0]))
    torch.testing.assert_close(attention_entropy(peaked), torch.tensor([0.0]))
    two = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(attention_entropy(two), torch.tensor([math.log(2) / math.log(4)]))
    with pytest.raises(ValueError, match="top_fraction must be in"):
        attention_concentration(uniform, 0.0)
    with pytest.raises(ValueError, match="x must be"):
        token_redundancy(torch.randn(3, 4))
