"""The timm Eva adapter (EVA-02 style, RoPE) on tiny random-init timm Eva models.

Oracles: the unpatched model (r = 0, remove); an eager re-implementation of the
blocks whose rotary rows for merged tokens are chosen by slow Python loops (r > 0);
brute-force representatives for random partitions; per-sample runs.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import turbo_adapters as ta
from turbo_adapters.families.timm_eva import rope_representatives
from turbo_core import TokenReducer, TurboConfig

timm_eva = pytest.importorskip("timm.models.eva")
from timm.layers import apply_rot_embed_cat  # noqa: E402

DEPTH = 4
PATCHES = 16
GRID_W = 4

VARIANTS = {
    "rope": {},
    "rope_mixed": {"rope_type": "mixed"},
    "regs_qknorm_layerscale": {"num_reg_tokens": 2, "qk_norm": True, "init_values": 0.1},
    "separate_qkv": {"qkv_fused": False},
    "no_rope": {"use_rot_pos_emb": False},
}


def make_eva(variant: str = "rope", seed: int = 0, **extra) -> nn.Module:
    kwargs = {"use_rot_pos_emb": True, **VARIANTS[variant], **extra}
    torch.manual_seed(seed)
    model = timm_eva.Eva(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=DEPTH,
        num_heads=4,
        swiglu_mlp=True,
        ref_feat_shape=(4, 4),
        num_classes=10,
        **kwargs,
    )
    with torch.no_grad():  # peaked attention and distinct tokens, so errors show
        for name, p in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                continue
            if p.dim() >= 2 and "token" not in name and "pos_embed" not in name:
                gain = 3.0 if any(s in name for s in ("qkv", "q_proj", "k_proj")) else 1.0
                nn.init.normal_(p, std=gain / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                nn.init.normal_(p, mean=1.0, std=0.2)
            else:
                nn.init.normal_(p, std=0.5)
        for blk in model.blocks:  # the non-persistent k_bias buffer stays zero in timm
            if getattr(blk.attn, "k_bias", None) is not None:
                blk.attn.k_bias.zero_()
    return model.eval()


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


def slow_representatives(source: torch.Tensor, prefix: int, num_slots: int, width: int):
    """For each slot, the member nearest the members' centroid (exact fractions), lowest first."""
    out = torch.empty(source.shape[0], num_slots, dtype=torch.long)
    for b in range(source.shape[0]):
        for slot in range(num_slots):
            members = [
                j for j in range(source.shape[1] - prefix) if source[b, prefix + j] == prefix + slot
            ]
            cy = Fraction(sum(j // width for j in members), len(members))
            cx = Fraction(sum(j % width for j in members), len(members))
            out[b, slot] = min(
                members, key=lambda j: ((j // width - cy) ** 2 + (j % width - cx) ** 2, j)
            )
    return out


def eager_eva_features(model: nn.Module, x: torch.Tensor, config: TurboConfig):
    reducer = TokenReducer(config)
    state = reducer.start(DEPTH)
    h, rope = model._pos_embed(model.patch_embed(x))
    h = model.norm_pre(h)
    npt = model.num_prefix_tokens
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        y = blk.norm1(h)
        batch, tokens, channels = y.shape
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(y, attn.qkv.weight, bias).reshape(batch, tokens, 3, 4, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        block_rope = rope[i] if model.rope_mixed else rope
        if state.size is not None:
            reps = slow_representatives(state.source, npt, tokens - npt, GRID_W)
            table = block_rope if block_rope.dim() == 3 else block_rope[None]  # (H', P, D)
            block_rope = torch.stack([table[:, reps[b]] for b in range(batch)])
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], block_rope)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], block_rope)], dim=2)
        logits = q @ k.transpose(-1, -2) * attn.scale
        if state.size is not None:
            logits = logits + state.size[:, None, None, :, 0].log()
        weights = logits.softmax(-1)
        out = attn.proj(attn.norm((weights @ v).transpose(1, 2).reshape(batch, tokens, channels)))
        h = h + (out if blk.gamma_1 is None else blk.gamma_1 * out)
        h = reducer.step(h, k.mean(1), state, weights[:, :, 0].mean(1))
        mlp = blk.mlp(blk.norm2(h))
        h = h + (mlp if blk.gamma_2 is None else blk.gamma_2 * mlp)
    return model.norm(h), state


# ---------------------------------------------------------------- representatives
def test_representatives_identity_and_brute_force() -> None:
    source = torch.arange(PATCHES + 1).expand(3, -1)
    assert torch.equal(
        rope_representatives(source, 1, PATCHES, GRID_W), torch.arange(16).expand(3, -1)
    )
    generator = torch.Generator().manual_seed(0)
    for slots, prefix in itertools.product([1, 3, 7, 12], [0, 1, 3]):
        # random partitions of 16 patches into `slots` non-empty slots, prefix fixed
        rows = []
        for _ in range(4):
            assign = torch.cat(
                [torch.arange(slots), torch.randint(slots, (PATCHES - slots,), generator=generator)]
            )
            assign = assign[torch.randperm(PATCHES, generator=generator)]
            rows.append(torch.cat([torch.arange(prefix), assign + prefix]))
        source = torch.stack(rows)
        got = rope_representatives(source, prefix, slots, GRID_W)
        assert torch.equal(got, slow_representatives(source, prefix, slots, GRID_W))


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
def test_r0_equals_unpatched(variant: str, fused: bool) -> None:
    model = make_eva(variant)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    x = images()
    with torch.no_grad():
        ref = model(x)
        handle = ta.apply(model, r=0)
        out = model(x)
    assert handle.last_state.token_counts == [PATCHES + model.num_prefix_tokens] * DEPTH
    tol = 1e-5 if fused else 2e-4
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("variant", ["rope", "rope_mixed", "regs_qknorm_layerscale"])
def test_merging_matches_eager_oracle(variant: str) -> None:
    model = make_eva(variant)
    x = images(3)
    handle = ta.apply(model, r=3, alpha=2.0)
    assert handle.site.needs_source  # the site tracks sources itself for RoPE
    with torch.no_grad():
        features = model.forward_features(x)
        ref, oracle_state = eager_eva_features(model, x, handle.config.replace(trace_source=True))
    assert handle.last_state.token_counts == oracle_state.token_counts
    assert torch.equal(handle.last_state.source, oracle_state.source)
    torch.testing.assert_close(features, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_counts_sources_and_protection(variant: str) -> None:
    model = make_eva(variant)
    handle = ta.apply(model, r=[3, 8, 2], trace_source=True)
    with torch.no_grad():
        model(images(3))
    state, prefix = handle.last_state, model.num_prefix_tokens
    counts = expected_counts(PATCHES + prefix, prefix, [3, 8, 2, 0])
    assert state.token_counts == counts
    slots = slot_counts(state.source, counts[-1])
    assert torch.equal(slots.float(), state.size[..., 0])
    assert torch.equal(state.source[:, :prefix], torch.arange(prefix).expand(3, prefix))
    assert torch.all(slots[:, :prefix] == 1)


@pytest.mark.parametrize("variant", ["rope", "no_rope"])
def test_alpha_zero_equals_redundancy_mode(variant: str) -> None:
    model = make_eva(variant)
    x = images(3)
    results = []
    for overrides in ({"alpha": 0.0}, {"mode": "redundancy", "alpha": 3.0}):
        with ta.patched(model, r=4, trace_source=True, **overrides) as handle, torch.no_grad():
            results.append((model(x), handle.last_state.source))
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][0], results[1][0])


def test_remove_restores_model_exactly_and_twice_raises() -> None:
    model = make_eva()
    x = images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        ta.apply(model, r=3)
        with pytest.raises(RuntimeError, match="already patched"):
            ta.apply(model, r=3)
        merged = model(x)
        ta.remove(model)
        after = model(x)
    assert not torch.equal(merged, ref)
    assert torch.equal(after, ref)
    assert type(model) is timm_eva.Eva
    state = model.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in before)


def test_batched_equals_per_sample() -> None:
    model = make_eva()
    x = images(3)
    handle = ta.apply(model, r=3)
    with torch.no_grad():
        batched = model(x)
        for i in range(3):
            torch.testing.assert_close(model(x[i : i + 1])[0], batched[i], atol=1e-5, rtol=1e-5)
    assert handle.last_state.token_counts[-1] < PATCHES


def test_bfloat16_and_gradients() -> None:
    model = make_eva().to(torch.bfloat16)
    with torch.no_grad():
        out = model(images().to(torch.bfloat16))
    handle = ta.apply(model, r=3)
    with torch.no_grad():
        merged = model(images().to(torch.bfloat16))
    assert merged.dtype == out.dtype == torch.bfloat16 and torch.isfinite(merged.float()).all()
    ta.remove(model)
    model = make_eva().train()
    x = images().requires_grad_(True)
    handle = ta.apply(model, r=3)
    model(x).logsumexp(-1).sum().backward()
    assert handle.last_state.token_counts[-1] < PATCHES
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_rope_tracks_sources_itself_and_needs_the_protected_prefix() -> None:
    model = make_eva()
    x = images()
    with torch.no_grad():
        traced = ta.apply(model, r=3, trace_source=True)
        ref = model(x)
        traced.remove()
        handle = ta.apply(model, r=3, trace_source=False)  # RoPE still places merged tokens
        out = model(x)
    assert handle.last_state.source is not None
    torch.testing.assert_close(out, ref)
    handle.remove()
    with pytest.raises(ValueError, match="protected"):
        ta.apply(make_eva(num_reg_tokens=2), r=3, protected=1)


@pytest.mark.parametrize("extra", [{"attn_type": "rope"}, {"use_post_norm": True}])
def test_unsupported_blocks_are_refused(extra) -> None:
    with pytest.raises(TypeError, match="EvaBlock"):
        ta.apply(make_eva(**extra), r=2)


def test_registry_names() -> None:
    timm = pytest.importorskip("timm")
    for name in timm.list_models(module="eva"):
        if name.startswith("eva"):
            assert ta.get_adapter(name).name == "timm-eva", name
    assert ta.get_adapter("eva02_tiny_patch14_224.mim_in22k").name == "timm-eva"
    assert ta.get_adapter("eva_large_patch14_196").name == "timm-vit"  # a VisionTransformer
    assert ta.adapter_for_model(make_eva()).name == "timm-eva"


def test_torchao_int8_with_separate_qkv() -> None:
    # timm's fused-qkv EvaAttention passes its weight to F.linear itself, which torchao's
    # int8 weight rejects even unpatched; with split q/k/v every projection is a module call
    quantization = pytest.importorskip("torchao.quantization")
    model = make_eva("separate_qkv")
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    x = images()
    with torch.no_grad():
        ref = model(x)
        handle = ta.apply(model, r=0)
        same = model(x)
        handle.r = 3
        merged = model(x)
    torch.testing.assert_close(same, ref, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(merged).all()
    prefix = model.num_prefix_tokens
    assert handle.last_state.token_counts == expected_counts(PATCHES + prefix, prefix, [3] * DEPTH)
