"""Stable Diffusion merge-and-restore beside diffusers extensions: IP-Adapter, LoRA, GLIGEN.

Each extension is built in code on a tiny UNet (no download): ratio 0 equals the
extended UNet unpatched bit for bit, ratio > 0 runs with the extension still acting and
gives back full-length output in the original spatial order. Oracles: the unpatched
extended UNet, the UNet without the extension (the extension must change the output,
or the test could not fail), and a one-position shift of the reference.
"""

from __future__ import annotations

import pytest
import torch

import turbo_adapters as ta

diffusers = pytest.importorskip("diffusers")

from turbo_adapters.families.stable_diffusion.guide import text_to_image_attention, text_token_mask  # noqa: E402
from turbo_eval.diffusion import structured_latents, tiny_unet_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = 32
MERGE = {"ratio_attn1": 0.5, "ratio_attn2": 0.5, "ratio_ff": 0.5}
SITE = "UNet2DConditionModel"


def make_unet(**changes):
    config = tiny_unet_config(cross_attention_dim=TEXT)
    config.update(changes)
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**config).eval()


def unet_inputs(batch=2, height=16, width=12):
    latent = structured_latents(batch, height, width, seed=0)
    text = torch.randn(batch, 7, TEXT, generator=torch.Generator().manual_seed(1))
    return latent, torch.tensor(10), text


def run(unet, inputs, **kwargs):
    with torch.no_grad():
        return unet(*inputs, **kwargs).sample


def assert_order_kept(out: torch.Tensor, reference: torch.Tensor) -> None:
    """Full length, and closer to the reference than a one-position shift of it."""
    assert out.shape == reference.shape and torch.isfinite(out).all()
    error = (out - reference).abs().mean()
    shifted = (reference.roll(1, dims=-1) - reference).abs().mean()
    assert 0 < error < 0.25 * shifted


def check_extension(unet, inputs, kwargs, without_kwargs=None):
    """The shared checks; returns the patched output and the patch's last stats."""
    reference = run(unet, inputs, **kwargs)
    if without_kwargs is not None:  # the extension acts (else nothing here could fail)
        assert (run(unet, inputs, **without_kwargs) - reference).abs().max() > 1e-4
    with ta.patched(unet, ratio_attn1=0.0, alpha=0.5):
        assert torch.equal(run(unet, inputs, **kwargs), reference)
    with ta.patched(unet, **MERGE, alpha=0.5) as patch:
        out = run(unet, inputs, **kwargs)
    stats = patch.last_stats[SITE]
    assert_order_kept(out, reference)
    assert torch.equal(run(unet, inputs, **kwargs), reference)  # removed
    return out, stats


# ------------------------------------------------------------------------ IP-Adapter
IMAGE_EMBED = 16


def add_ip_adapter(unet, tokens: int = 4):
    """An IP-Adapter built in code: image projection plus IPAdapterAttnProcessor2_0 on attn2."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    torch.manual_seed(1)
    projection = ImageProjection(IMAGE_EMBED, TEXT, num_image_text_embeds=tokens)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    processors = {}
    for name in unet.attn_processors:
        attention = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn2.processor"):
            processor = IPAdapterAttnProcessor2_0(
                attention.to_k.out_features, TEXT, num_tokens=tokens, scale=1.0
            )
            with torch.no_grad():
                for linear in [*processor.to_k_ip, *processor.to_v_ip]:
                    linear.weight.normal_(0.0, 0.2)
            processors[name] = processor
        else:
            processors[name] = AttnProcessor2_0()
    unet.set_attn_processor(processors)
    return unet


def ip_kwargs(batch=2, scale=1.0):
    embeds = torch.randn(batch, 1, IMAGE_EMBED, generator=torch.Generator().manual_seed(3))
    return {"added_cond_kwargs": {"image_embeds": [scale * embeds]}}


def test_ip_adapter_composes():
    unet = add_ip_adapter(make_unet())
    inputs = unet_inputs()
    _, stats = check_extension(unet, inputs, ip_kwargs(), ip_kwargs(scale=0.0))
    assert stats.merged == {"attn1": 3, "attn2": 3, "ff": 3} and not stats.passed


def test_ip_adapter_masks_pass_cross_attention_through():
    """A per-position IP-Adapter mask cannot follow merged queries: attn2 runs unmerged."""
    unet = add_ip_adapter(make_unet())
    inputs = unet_inputs(height=16, width=16)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1.0  # the image prompt acts on the left half only
    masked = {**ip_kwargs(), "cross_attention_kwargs": {"ip_adapter_masks": [mask]}}
    out, stats = check_extension(unet, inputs, masked, ip_kwargs())
    assert stats.merged["attn2"] == 0 and stats.merged["ff"] == 3
    assert {(c, r) for _, c, r in stats.passed} == {("attn2", "IP-Adapter masks per position")}
    with ta.patched(unet, **{**MERGE, "ratio_attn2": 0.0}, alpha=0.5):
        expected = run(unet, inputs, **masked)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------- LoRA
def test_peft_lora_composes():
    peft = pytest.importorskip("peft")
    unet = make_unet()
    inputs = unet_inputs()
    plain = run(unet, inputs)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj"],
        init_lora_weights=False,  # random A and B: the LoRA changes the output
    )
    unet.add_adapter(config)
    attn2 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert type(attn2.to_q).__module__.startswith("peft")
    reference = run(unet, inputs)
    assert (reference - plain).abs().max() > 1e-4
    _, stats = check_extension(unet, inputs, {})
    assert stats.merged == {"attn1": 3, "attn2": 3, "ff": 3}
    # the semantic map calls attn2's projections as modules: it sees the LoRA
    image = torch.randn(2, 12, attn2.to_q.in_features, generator=torch.Generator().manual_seed(5))
    keep = text_token_mask(2, 7, image.device)
    with torch.no_grad():
        with_lora = text_to_image_attention(attn2, image, inputs[2], keep)
        unet.disable_adapters()
        without_lora = text_to_image_attention(attn2, image, inputs[2], keep)
    assert (with_lora - without_lora).abs().max() > 1e-4


# --------------------------------------------------------------------------- GLIGEN
def gligen_kwargs(batch=2, objects=2):
    generator = torch.Generator().manual_seed(4)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.4, 0.3, 1.0, 0.9]])[:objects]
    return {
        "cross_attention_kwargs": {
            "gligen": {
                "boxes": boxes.expand(batch, -1, -1).clone(),
                "positive_embeddings": torch.randn(batch, objects, TEXT, generator=generator),
                "masks": torch.ones(batch, objects),
            }
        }
    }


def test_gligen_fuser_sees_full_length_tokens():
    """GLIGEN's gated self-attention (the block's ``fuser``) runs between attn1 and attn2 on
    the block's hidden states: those are full length (attn1's output is restored before the
    residual), so the fuser attends over every image token plus the grounding tokens."""
    unet = make_unet(attention_type="gated")
    fusers = [m for m in unet.modules() if type(m).__name__ == "GatedSelfAttentionDense"]
    assert len(fusers) == 4
    with torch.no_grad():  # library init gates the fuser off (tanh(0) = 0)
        for fuser in fusers:
            fuser.alpha_attn.fill_(1.0)
            fuser.alpha_dense.fill_(1.0)
    seen: list[int] = []
    handles = [
        f.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for f in fusers
    ]
    inputs = unet_inputs(height=16, width=12)
    with ta.patched(unet, **MERGE, alpha=0.5) as patch:
        with_boxes = run(unet, inputs, **gligen_kwargs())
        without_boxes = run(unet, inputs)
    assert patch.last_stats[SITE].merged["attn1"] == 3
    assert (with_boxes - without_boxes).abs().max() > 1e-4  # grounding still acts
    full = 16 * 12
    assert seen[:4] == [full, full // 4, full, full]  # down, mid (8x6), up, up: unmerged
    for handle in handles:
        handle.remove()
    _, stats = check_extension(unet, inputs, gligen_kwargs(), {})
    assert stats.merged == {"attn1": 3, "attn2": 3, "ff": 3} and not stats.passed
