"""IP-Adapter on diffusion transformers, with Turbo's patch on top.

Tiny IP-Adapters built in code as diffusers' loaders build them from a checkpoint
(random weights, no download): FLUX's ``FluxIPAdapterAttnProcessor`` on the double
blocks' attention with an ``ImageProjection`` as ``encoder_hid_proj``; SD3's
``SD3IPAdapterJointAttnProcessor2_0`` on every joint attention with an
``IPAdapterTimeImageProjection`` as ``image_proj``. Oracles: the unpatched transformer
with the IP-Adapter active (ratio 0 bit-identical), each batch row alone.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import turbo_adapters as ta
from turbo_adapters import TurboBypassWarning
from turbo_core import CopyRestorer

diffusers = pytest.importorskip("diffusers")

from support.tiny_dit import (  # noqa: E402
    TEXT_DIM,
    flux_ids,
    flux_inputs,
    sd3_inputs,
    tiny_flux,
    tiny_sd3,
)

IMAGE_EMBED_DIM = 12


def flux_with_ip_adapter():
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    model = tiny_flux()
    torch.manual_seed(4)
    projection = ImageProjection(
        image_embed_dim=IMAGE_EMBED_DIM, cross_attention_dim=TEXT_DIM, num_image_text_embeds=4
    )
    model.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    for block in model.transformer_blocks:  # the loader leaves the single blocks alone
        block.attn.set_processor(
            FluxIPAdapterAttnProcessor(
                hidden_size=model.inner_dim, cross_attention_dim=TEXT_DIM, num_tokens=(4,)
            )
        )
    return model.eval()


def sd3_with_ip_adapter():
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    model = tiny_sd3()
    torch.manual_seed(4)
    model.image_proj = IPAdapterTimeImageProjection(
        embed_dim=IMAGE_EMBED_DIM,
        output_dim=24,
        hidden_dim=16,
        depth=1,
        dim_head=8,
        heads=2,
        num_queries=4,
        ffn_ratio=2,
        timestep_in_dim=8,
    )
    for block in model.transformer_blocks:
        block.attn.set_processor(
            SD3IPAdapterJointAttnProcessor2_0(
                hidden_size=16, ip_hidden_states_dim=24, head_dim=8, timesteps_emb_dim=16, scale=1.0
            )
        )
    return model.eval()


def ip_embeds(name, batch, seed=11):
    g = torch.Generator().manual_seed(seed)
    if name == "flux":  # one IP-Adapter, one image per row
        return [torch.randn(batch, 1, IMAGE_EMBED_DIM, generator=g)]
    return torch.randn(batch, 5, IMAGE_EMBED_DIM, generator=g)  # SD3: image features


MODELS = {"flux": (flux_with_ip_adapter, flux_inputs), "sd3": (sd3_with_ip_adapter, sd3_inputs)}


def run(model, inputs, embeds=None):
    """One call; the transformer pops the embeddings from its kwargs: a fresh dict."""
    kwargs = dict(inputs)
    if embeds is not None:
        kwargs["joint_attention_kwargs"] = {"ip_adapter_image_embeds": embeds}
    with torch.no_grad():
        return model(**kwargs).sample


@pytest.mark.parametrize("name", list(MODELS))
def test_ip_adapter_keep_all_is_bit_identical_and_half_merges(name):
    build, inputs = MODELS[name]
    model, x = build(), inputs(1)
    embeds = ip_embeds(name, 1)
    reference = run(model, x, embeds)
    other_image = run(model, x, ip_embeds(name, 1, seed=12))
    assert (reference - other_image).abs().max() > 1e-3  # the IP-Adapter acts
    with ta.patched(model, ratio=0):
        assert torch.equal(run(model, x, embeds), reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TurboBypassWarning)
        with ta.patched(model, ratio=0.5, use_rand=False) as patch:
            out = run(model, x, embeds)
    (stats,) = patch.last_stats.values()
    assert stats.merged["attn1"] == len(stats.tokens) > 0 and not stats.passed
    assert out.shape == reference.shape and not torch.equal(out, reference)
    assert (out - reference).norm() < 0.2 * reference.norm()
    assert torch.equal(run(model, x, embeds), reference)  # removed


class Recording(CopyRestorer):
    def __init__(self) -> None:
        self.plans = []

    def restore(self, y, plan):
        self.plans.append(plan)
        return super().restore(y, plan)


def test_flux_ip_output_is_restored_like_the_image_output():
    """FLUX's IP-Adapter processor returns a third output, the merged image tokens'
    attention to the reference image: restored to full length as out[0] is. Oracle:
    the processor called by hand on the group means, with the kept tokens' rotary rows
    from the model's own position embedding, each group's outputs copied back."""
    model, x = flux_with_ip_adapter().double(), flux_inputs(1)
    x = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    embeds = [ip_embeds("flux", 1)[0].double()]
    attn = model.transformer_blocks[0].attn
    captured, outputs = {}, []

    def keep(module, args, kwargs):
        captured.setdefault("kwargs", kwargs)

    handle = attn.register_forward_pre_hook(keep, with_kwargs=True)  # before Turbo's: unmerged
    recording = Recording()
    with ta.patched(model, ratio=0.5, ratio_ff=0.0, use_rand=False, restorer=recording):
        hook = attn.register_forward_hook(lambda m, a, out: outputs.append(out))  # after
        run(model, x, embeds)
        hook.remove()
    handle.remove()
    kwargs, plan = captured["kwargs"], recording.plans[0]
    image = kwargs["hidden_states"][0]
    groups = {s: [int(t)] for s, t in enumerate(plan.kept_idx[0])}
    for t, s in zip(plan.merged_idx[0].tolist(), plan.merged_into[0].tolist(), strict=True):
        groups[s].append(t)
    merged = torch.stack([image[groups[s]].mean(0) for s in range(len(groups))])[None]
    img_ids, txt_ids = flux_ids(8, 8)
    rotary = model.pos_embed(torch.cat([txt_ids, img_ids[plan.kept_idx[0]]]).double())
    with torch.no_grad():
        y = attn.processor(
            attn,
            merged,
            kwargs["encoder_hidden_states"],
            None,
            rotary,
            ip_hidden_states=kwargs["ip_hidden_states"],
        )
    got = outputs[0]
    assert len(got) == 3 and got[2].shape == got[0].shape == (1, 64, model.inner_dim)
    for index in (0, 2):  # the image output and the IP output, restored alike
        expected = torch.empty_like(got[index])
        for s, members in groups.items():
            expected[0, members] = y[index][0, s]
        torch.testing.assert_close(got[index], expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got[1], y[1], rtol=1e-9, atol=1e-10)  # the text, as is


def test_flux_ip_adapter_batch_rows_equal_each_row_alone():
    """Rows with different plans run the attention group by group: the IP-Adapter's
    embeddings (a list of per-row tensors) follow their rows."""
    model, x = flux_with_ip_adapter(), flux_inputs(2)
    embeds = ip_embeds("flux", 2)
    with ta.patched(model, ratio=0.5) as patch:
        batched = run(model, x, embeds)
        (stats,) = patch.last_stats.values()
        for b in range(2):
            patch.new_generation()
            row = {k: v[b : b + 1] if k not in ("img_ids", "txt_ids") else v for k, v in x.items()}
            alone = run(model, row, [embeds[0][b : b + 1]])
            torch.testing.assert_close(alone, batched[b : b + 1], rtol=1e-4, atol=1e-5)
    assert stats.merged["attn1"] == 3 and not stats.passed
