"""The semantic term on diffusion transformers: the text's attention over the image tokens.

Oracles: the joint attention computed in float64 by hand from the model's own weights
(every query, every key, the full softmax; diffusers' own rotary function for FLUX),
whose text rows give the expected value; for PixArt the cross-attention's logits by
hand. Through the patch: with a huge alpha the merged tokens must be the sources with
the lowest expected value; alpha=0 is the redundancy ranking, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import turbo_adapters as ta
from turbo_adapters.families.dit import DIT_SEMANTIC_ALPHA
from turbo_adapters.families.stable_diffusion import hooks as sd_hooks
from turbo_adapters.families.stable_diffusion.guide import joint_text_attention
from turbo_core import CopyRestorer, window_destinations

diffusers = pytest.importorskip("diffusers")

from support.tiny_dit import (  # noqa: E402
    flux_inputs,
    pixart_inputs,
    sd3_inputs,
    tiny_flux,
    tiny_pixart,
    tiny_sd3,
)

MODELS = {
    "pixart": (tiny_pixart, pixart_inputs),
    "sd3": (tiny_sd3, sd3_inputs),
    "sd3.5": (lambda: tiny_sd3(dual=True), sd3_inputs),
    "flux": (tiny_flux, flux_inputs),
}


def double(model, inputs):
    model = model.double()
    floating = {k for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()}
    return model, {k: v.double() if k in floating else v for k, v in inputs.items()}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def capture(module, model, inputs):
    """The keyword inputs of ``module``'s first call in an unpatched run."""
    seen = {}

    def keep(mod, args, kwargs):
        if args:  # the hidden states given by position
            kwargs = {"hidden_states": args[0], **kwargs}
        seen.setdefault("kwargs", dict(kwargs))

    handle = module.register_forward_pre_hook(keep, with_kwargs=True)
    run(model, inputs)
    handle.remove()
    return seen["kwargs"]


def rms(x, norm):
    if norm is None:
        return x
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight


def project(linear, x, heads, norm):
    y = F.linear(x, linear.weight, linear.bias)
    return rms(y.view(*y.shape[:2], heads, -1), norm)


def rotate(x, rotary):
    """FLUX's rotary embedding in complex form, float64: channel pairs (2k, 2k+1) are
    one complex number, turned by the angle whose (cos, sin) the tables repeat twice."""
    cos, sin = (t.double() for t in rotary)
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.equal(sin[:, 0::2], sin[:, 1::2])
    turn = torch.complex(cos[:, 0::2], sin[:, 0::2])[None, :, None, :]  # (1, S, 1, D/2)
    pairs = torch.complex(x[..., 0::2].contiguous(), x[..., 1::2].contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2)


def eager_joint(attn, image, text, *, single, rotary, text_first):
    """(B, N): the text rows of the full joint softmax, image columns, mean over heads
    and text tokens, rescaled to mean 1; float64, by hand."""
    heads = attn.heads
    if single:
        q_text = project(attn.to_q, text, heads, attn.norm_q)
        k_text = project(attn.to_k, text, heads, attn.norm_k)
    else:
        q_text = project(attn.add_q_proj, text, heads, getattr(attn, "norm_added_q", None))
        k_text = project(attn.add_k_proj, text, heads, getattr(attn, "norm_added_k", None))
    q_image = project(attn.to_q, image, heads, attn.norm_q)
    k_image = project(attn.to_k, image, heads, attn.norm_k)
    parts = (q_text, q_image, k_text, k_image) if text_first else (q_image, q_text, k_image, k_text)
    query, key = torch.cat(parts[:2], 1), torch.cat(parts[2:], 1)  # (B, S, H, D)
    if rotary is not None:
        query, key = rotate(query, rotary), rotate(key, rotary)
    probs = torch.einsum("bshd,bthd->bhst", query, key) / query.shape[-1] ** 0.5
    probs = probs.softmax(-1)  # (B, H, S, S): every query, every key
    num_text, num_image = text.shape[1], image.shape[1]
    text_rows = slice(0, num_text) if text_first else slice(num_image, None)
    image_columns = slice(num_text, None) if text_first else slice(0, num_image)
    rows = probs[:, :, text_rows, image_columns]
    value = rows.mean(1).mean(1)  # (B, N)
    return value * num_image / value.sum(-1, keepdim=True)


def expected_value(name, model, inputs):
    """(B, N) semantic value of the first block, by hand, and the block's attention."""
    if name == "flux-single":
        block = model.single_transformer_blocks[0]
        kwargs = capture(block.attn, model, inputs)
        num_text = inputs["encoder_hidden_states"].shape[1]
        x = kwargs["hidden_states"]
        image, text = x[:, num_text:], x[:, :num_text]
        value = eager_joint(
            block.attn, image, text, single=True, rotary=kwargs["image_rotary_emb"], text_first=True
        )
        return value, (block.attn, image, text, True, kwargs["image_rotary_emb"])
    block = model.transformer_blocks[0]
    kwargs = capture(block.attn, model, inputs)
    image, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    rotary = kwargs.get("image_rotary_emb")
    value = eager_joint(
        block.attn, image, text, single=False, rotary=rotary, text_first=rotary is not None
    )
    return value, (block.attn, image, text, False, rotary)


@pytest.mark.parametrize("name", ["sd3", "sd3.5", "flux", "flux-single"])
def test_joint_text_attention_equals_the_eager_float64_joint_softmax(name):
    build, inputs = MODELS["flux" if name.startswith("flux") else name]
    model, x = double(build(), inputs(2))
    expected, (attn, image, text, single, rotary) = expected_value(name, model, x)
    with torch.no_grad():
        got = joint_text_attention(attn, image, text, shared=single, rotary=rotary)
    assert got.shape == expected.shape == (2, image.shape[1])
    # diffusers' RMSNorm (SD3.5's qk norm) takes its variance in float32
    tol = 1e-5 if name == "sd3.5" else 1e-10
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert expected.std() > 1e-3  # the value discriminates between image tokens
    assert not torch.allclose(expected[0], expected[1])  # and is per row


class Recording(CopyRestorer):
    def __init__(self) -> None:
        self.plans = []

    def restore(self, y, plan):
        self.plans.append(plan)
        return super().restore(y, plan)


def first_plan(model, x, **settings):
    recording = Recording()
    with ta.patched(model, ratio=0.5, use_rand=False, restorer=recording, **settings) as patch:
        out = run(model, x)
    (stats,) = patch.last_stats.values()
    assert stats.merged["attn1"] > 0 and not stats.passed
    return recording.plans[0], out


def pixart_expected_value(model, x):
    """PixArt: attn2's logits (image queries from the block's input, caption keys)
    normalised over the image per text token, mean over heads and text tokens after
    the first (the start token), times N; float64, by hand."""
    block = model.transformer_blocks[0]
    kwargs = capture(block, model, x)
    image, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    attn = block.attn2
    query = project(attn.to_q, image, attn.heads, None)  # (B, N, H, D)
    key = project(attn.to_k, text, attn.heads, None)  # (B, T, H, D)
    logits = torch.einsum("bthd,bnhd->bhtn", key, query) / query.shape[-1] ** 0.5
    maps = logits.softmax(-1).mean(1)[:, 1:]  # (B, T-1, N)
    return maps.mean(1) * image.shape[1]


@pytest.mark.parametrize("name", ["pixart", "sd3", "sd3.5", "flux"])
def test_a_huge_alpha_merges_the_sources_of_lowest_value(name):
    """E = R - alpha * A with alpha = 1e6: A alone decides, so the merged sources of the
    first block are the r sources with the lowest hand-computed value; alpha = 0 picks
    other tokens on the same input (the case is built with smooth latents, where
    redundancy ranks by similarity and not by the text)."""
    build, inputs = MODELS[name]
    model, x = double(build(), inputs(1))
    if name == "pixart":
        value = pixart_expected_value(model, x)
    else:
        value, _ = expected_value(name, model, x)
    semantic, _ = first_plan(model, x, alpha=1e6)
    redundancy, _ = first_plan(model, x, alpha=0.0)
    height, width = (8, 8)
    num_tokens = value.shape[1]
    dst = window_destinations(height, width, 2, 2)
    is_src = torch.ones(num_tokens, dtype=torch.bool)
    is_src[dst] = False
    sources = is_src.nonzero().squeeze(1)
    r = semantic.r
    lowest = sources[value[0, sources].argsort()[:r]]
    assert set(semantic.merged_idx[0].tolist()) == set(lowest.tolist())
    assert set(redundancy.merged_idx[0].tolist()) != set(lowest.tolist())


@pytest.mark.parametrize("name", list(MODELS))
def test_alpha_zero_is_the_redundancy_ranking_exactly(name, monkeypatch):
    """The default, alpha=0 and the 'dit-redundancy' preset give one output bit for bit,
    without computing a semantic value at all; the 'dit-semantic' preset changes it."""
    build, inputs = MODELS[name]
    model, x = build(), inputs(2)
    with ta.patched(model, ratio=0.5) as patch:
        default = run(model, x)
    assert patch.config.alpha == 0.0
    semantic_preset = ta.apply(model, "dit-semantic", ratio=0.5)
    assert semantic_preset.config.alpha == DIT_SEMANTIC_ALPHA > 0
    with_semantic = run(model, x)
    semantic_preset.remove()

    def refuse(*args, **kwargs):
        raise AssertionError("a semantic value was computed at alpha=0")

    monkeypatch.setattr(sd_hooks, "joint_text_attention", refuse)
    monkeypatch.setattr(sd_hooks, "text_to_image_attention", refuse)
    for settings in ({"alpha": 0.0}, {"alpha": 0}):
        with ta.patched(model, ratio=0.5, **settings):
            assert torch.equal(run(model, x), default)
    with ta.patched(model, "dit-redundancy", ratio=0.5):
        assert torch.equal(run(model, x), default)
    assert not torch.equal(with_semantic, default)


def test_the_semantic_value_follows_the_cfg_pair_in_a_pipeline_batch():
    """A bare SD3 transformer told its batch is [unconditional; conditional]
    (cfg_halves=True): the conditional half's value plans both halves (one plan)."""
    model, x = tiny_sd3(), sd3_inputs(4)
    recording = Recording()
    with ta.patched(model, "dit-semantic", ratio=0.5, cfg_halves=True, restorer=recording) as patch:
        run(model, x)
    (stats,) = patch.last_stats.values()
    assert stats.merged["attn1"] == 2 and not stats.passed
    plan = recording.plans[0]
    assert torch.equal(plan.kept_idx[:2], plan.kept_idx[2:])
    assert not torch.equal(plan.kept_idx[0], plan.kept_idx[1])


def test_a_model_without_text_refuses_the_semantic_term():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()
    with pytest.raises(ValueError, match=r"alpha=0.1: .*no text attention.*alpha=0"):
        ta.apply(model, "dit-semantic")
    assert not any(m._forward_pre_hooks for m in model.modules())
    with ta.patched(model, ratio=0.5) as patch:
        assert patch.config.alpha == 0.0
