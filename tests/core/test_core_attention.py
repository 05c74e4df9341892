"""Attention helpers against the materialised attention matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from turbo_core import add_size_bias, guide_attention, size_log_bias


def eager_attention(q, k, v, size=None):
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if size is not None:
        logits = logits + size[:, None, None, :, 0].log()
    weights = logits.softmax(dim=-1)
    return weights @ v, weights


@given(
    st.integers(0, 10**6),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 30),
    st.integers(1, 16),
    st.booleans(),
)
def test_guide_row_equals_row_of_full_matrix(seed, batch, heads, tokens, dim, with_size):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=g) for _ in range(3))
    size = torch.randint(1, 6, (batch, tokens, 1), generator=g).float() if with_size else None
    _, weights = eager_attention(q, k, v, size)
    row = guide_attention(q[:, :, 0], k, size=size)
    torch.testing.assert_close(row, weights[:, :, 0].mean(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(row.sum(-1), torch.ones(batch))


@given(st.integers(0, 10**6), st.sampled_from([torch.float32, torch.bfloat16]))
def test_size_bias_makes_fused_sdpa_proportional(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g).to(dtype) for _ in range(3))
    size = torch.randint(1, 9, (2, 11, 1), generator=g).float()
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=size_log_bias(size, dtype))
    eager, _ = eager_attention(q.double(), k.double(), v.double(), size.double())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(fused.double(), eager, rtol=tol, atol=tol)


def test_add_size_bias_combines_boolean_and_additive_masks():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    allowed = torch.tensor([[[[True, False, True]]]])
    combined = add_size_bias(allowed, size, torch.float32)
    assert combined[0, 0, 0, 1] == -torch.inf
    torch.testing.assert_close(combined[0, 0, 0, [0, 2]], torch.tensor([1.0, 4.0]).log())
    additive = torch.full((1, 1, 1, 3), 0.5)
    torch.testing.assert_close(
        add_size_bias(additive, size, torch.float32)[0, 0, 0], 0.5 + size[0, :, 0].log()
    )
    assert add_size_bias(allowed, None, torch.float32) is allowed
    assert size_log_bias(None, torch.float32) is None


@given(
    st.integers(0, 10**6),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 20),
    st.integers(1, 8),
)
def test_guide_row_of_keys_sliced_from_a_fused_qkv(seed, batch, heads, tokens, dim):
    # (B, N, 3, H, D) -> q, k, v as (B, H, N, D) views: the layout timm/torchvision produce
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads, dim, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    _, weights = eager_attention(q.contiguous(), k.contiguous(), v.contiguous())
    row = guide_attention(q[:, :, 0], k)
    torch.testing.assert_close(row, weights[:, :, 0].mean(dim=1), rtol=1e-5, atol=1e-6)


def test_size_bias_of_a_float64_model_is_float64_exact():
    """Sizes are float32 counts; their log for a float64 model is taken in float64
    (a float32 log would round the bias to ~1e-7 and cap float64 oracles there)."""
    size = torch.tensor([[[1.0], [3.0], [7.0], [11.0]]])
    bias = size_log_bias(size, torch.float64)
    assert bias.dtype == torch.float64
    assert torch.equal(bias[0, 0, 0], size[0, :, 0].double().log())
    assert not torch.equal(size[0, :, 0].log().double(), size[0, :, 0].double().log())
    half = size_log_bias(size, torch.bfloat16)  # narrow models: as before, float32 log
    assert torch.equal(half[0, 0, 0], size[0, :, 0].log().to(torch.bfloat16))
