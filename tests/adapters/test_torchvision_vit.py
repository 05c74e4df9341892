"""The torchvision ViT adapter on tiny random-init torchvision VisionTransformers.

Oracles: the unpatched model (nn.MultiheadAttention's own kernels) for r = 0 and
after remove; an eager re-implementation of EncoderBlock with an explicit softmax
for r > 0; per-sample runs for batching.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import turbo_adapters as ta
from turbo_core import TokenReducer, TurboConfig

tv_vit = pytest.importorskip("torchvision.models.vision_transformer")

DEPTH = 4
PATCHES = 16


def make_vit(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    model = tv_vit.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=DEPTH,
        num_heads=4,
        hidden_dim=48,
        mlp_dim=96,
        num_classes=10,
        dropout=dropout,
        attention_dropout=dropout,
    )
    _informative_init(model)
    return model.eval()


@torch.no_grad()
def _informative_init(model: nn.Module) -> None:
    """Peaked attention and distinct tokens, so errors in q, k or the bias show."""
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "class_token" not in name and "pos_embedding" not in name:
            gain = 3.0 if "in_proj" in name else 1.0
            nn.init.normal_(p, std=gain / p[0].numel() ** 0.5)
        elif "ln" in name and name.endswith("weight"):
            nn.init.normal_(p, mean=1.0, std=0.2)
        else:
            nn.init.normal_(p, std=0.5)


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, 32, 32)


def expected_counts(num_tokens: int, protected: int, schedule) -> list[int]:
    counts = []
    for r in schedule:
        num_tokens -= max(min(r, (num_tokens - protected) // 2), 0)
        counts.append(num_tokens)
    return counts


def slot_counts(source: torch.Tensor, num_slots: int) -> torch.Tensor:
    return torch.stack([torch.bincount(row, minlength=num_slots) for row in source])


def eager_turbo_forward(model: nn.Module, x: torch.Tensor, config: TurboConfig):
    """EncoderBlock re-written with an explicit softmax and proportional attention."""
    reducer = TokenReducer(config)
    state = reducer.start(DEPTH)
    tokens = model._process_input(x)
    h = torch.cat([model.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
    h = h + model.encoder.pos_embedding
    for blk in model.encoder.layers:
        mha = blk.self_attention
        y = blk.ln_1(h)
        batch, num, channels = y.shape
        heads = mha.num_heads
        qkv = F.linear(y, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.view(batch, num, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / (channels // heads) ** 0.5
        if state.size is not None:
            logits = logits + state.size[:, None, None, :, 0].log()
        weights = logits.softmax(-1)
        h = h + mha.out_proj((weights @ v).transpose(1, 2).reshape(batch, num, channels))
        h = reducer.step(h, k.mean(1), state, weights[:, :, 0].mean(1))
        h = h + blk.mlp(blk.ln_2(h))
    return model.heads(model.encoder.ln(h)[:, 0]), state


@pytest.mark.parametrize("grad", [False, True])
def test_r0_equals_unpatched(grad: bool) -> None:
    # no_grad in eval takes MultiheadAttention's native fast path; with grad the math path
    model = make_vit()
    x = images()
    with torch.set_grad_enabled(grad):
        ref = model(x)
        handle = ta.apply(model, r=0)
        out = model(x)
    assert handle.last_state.token_counts == [PATCHES + 1] * DEPTH
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_merging_matches_eager_oracle(alpha: float) -> None:
    model = make_vit()
    x = images(3)
    handle = ta.apply(model, r=3, alpha=alpha, trace_source=True)
    with torch.no_grad():
        out = model(x)
        ref, oracle_state = eager_turbo_forward(model, x, handle.config)
    assert handle.last_state.token_counts == oracle_state.token_counts
    assert torch.equal(handle.last_state.source, oracle_state.source)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("r", [2, [5, 0, 3], (4, -1.0)])
def test_token_counts_follow_schedule(r) -> None:
    model = make_vit()
    handle = ta.apply(model, r=r, trace_source=True)
    with torch.no_grad():
        model(images())
    state = handle.last_state
    counts = expected_counts(PATCHES + 1, 1, TurboConfig(r=r).schedule(DEPTH))
    assert state.token_counts == counts
    assert torch.equal(slot_counts(state.source, counts[-1]).float(), state.size[..., 0])


def test_encoder_alone_is_scoped() -> None:
    model = make_vit()
    handle = ta.apply(model, r=2)
    tokens = torch.randn(2, PATCHES + 1, 48)
    with torch.no_grad():
        out = model.encoder(tokens)
    assert out.shape[1] == handle.last_state.token_counts[-1] < PATCHES


def test_alpha_zero_equals_redundancy_mode() -> None:
    model = make_vit()
    x = images(3)
    sources, outputs = [], []
    for overrides in ({"alpha": 0.0}, {"mode": "redundancy", "alpha": 3.0}):
        with ta.patched(model, r=4, trace_source=True, **overrides) as handle, torch.no_grad():
            outputs.append(model(x))
            sources.append(handle.last_state.source)
    assert torch.equal(sources[0], sources[1])
    assert torch.equal(outputs[0], outputs[1])


def test_class_token_never_merges() -> None:
    model = make_vit()
    handle = ta.apply(model, r=8, trace_source=True)
    with torch.no_grad():
        model(images(4))
    source = handle.last_state.source
    counts = slot_counts(source, handle.last_state.token_counts[-1])
    assert handle.config.protected == 1
    assert torch.equal(source[:, 0], torch.zeros(4, dtype=torch.long))
    assert torch.all(counts[:, 0] == 1)


def test_remove_restores_model_exactly() -> None:
    model = make_vit()
    x = images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with torch.no_grad():
        ref = model(x)
        ta.apply(model, r=3)
        merged = model(x)
        ta.remove(model)
        after = model(x)
    assert not torch.equal(merged, ref)
    assert torch.equal(after, ref)
    assert [type(m) for m in model.modules()] == classes
    state = model.state_dict()
    assert list(state) == list(before)
    assert all(torch.equal(state[k], before[k]) for k in before)


def test_patching_twice_raises_and_context_manager() -> None:
    model = make_vit()
    x = images()
    with torch.no_grad():
        ref = model(x)
        with ta.patched(model, r=3) as handle:
            with pytest.raises(RuntimeError, match="already patched"):
                ta.apply(model, r=1)
            model(x)
            assert handle.last_state.token_counts[-1] < PATCHES
            handle.r = 0  # takes effect without re-patching
            model(x)
            assert handle.last_state.token_counts == [PATCHES + 1] * DEPTH
        assert torch.equal(model(x), ref)
    assert type(model) is tv_vit.VisionTransformer


def test_batched_equals_per_sample() -> None:
    model = make_vit()
    x = images(4)
    handle = ta.apply(model, r=3, trace_source=True)
    with torch.no_grad():
        batched = model(x)
        batched_source = handle.last_state.source
        for i in range(4):
            single = model(x[i : i + 1])
            assert torch.equal(handle.last_state.source[0], batched_source[i])
            torch.testing.assert_close(single[0], batched[i], atol=1e-5, rtol=1e-5)


def test_bfloat16() -> None:
    model = make_vit().to(torch.bfloat16)
    x = images().to(torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        handle = ta.apply(model, r=0)
        same = model(x)
        handle.r = 3
        merged = model(x)
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(same, ref, atol=0.1, rtol=5e-2)
    assert torch.isfinite(merged.float()).all()
    assert handle.last_state.token_counts[-1] < PATCHES


def test_gradients_are_finite_in_training() -> None:
    model = make_vit(dropout=0.1).train()
    x = images().requires_grad_(True)
    handle = ta.apply(model, r=3)
    model(x).logsumexp(-1).sum().backward()
    assert handle.last_state.token_counts[-1] < PATCHES
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_real_vit_b_32_architecture() -> None:
    from torchvision.models import vit_b_32

    torch.manual_seed(0)
    model = vit_b_32().eval()  # random init: no download
    assert ta.get_adapter("vit_b_32").matches(model)
    handle = ta.apply(model, adapter="vit_b_32", r=8)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert handle.last_state.token_counts == expected_counts(50, 1, [8] * 12)
