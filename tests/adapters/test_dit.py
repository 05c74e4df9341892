"""Diffusion transformers (PixArt, SD3 / SD3.5, FLUX) on real diffusers classes, tiny configs.

Oracles: the unpatched transformer (ratio 0, remove), per-sample calls (batching), and
for FLUX's rotary rows the model's own position embedding of the kept tokens' ids.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import turbo_adapters as ta
from turbo_adapters import TurboBypassWarning
from turbo_core import CopyRestorer, MergePlan

diffusers = pytest.importorskip("diffusers")

from support.tiny_dit import (  # noqa: E402
    flux_ids,
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


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def stats_of(patch):
    (stats,) = patch.last_stats.values()
    return stats


# ----------------------------------------------------------- the grid from the model
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("size", [(16, 16), (16, 12)])
def test_grid_comes_from_the_model_and_every_block_merges(name, size):
    """PixArt was a silent no-op: its grid came from a Transformer2DModel pre-hook it lacks."""
    build, inputs = MODELS[name]
    model = build()
    if name == "flux":
        size = (size[0] // 2, size[1] // 2)  # FLUX takes packed tokens: the grid itself
    x = inputs(1, *size)
    reference = run(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TurboBypassWarning)
        with ta.patched(model, ratio=0.5, use_rand=False) as patch:
            out = run(model, x)
    stats = stats_of(patch)
    blocks = [b for b in model.modules() if type(b).__name__.endswith("TransformerBlock")]
    tokens = size[0] * size[1] // (1 if name == "flux" else 4)
    assert [n for _, n, _ in stats.tokens] == [tokens] * len(blocks)
    assert stats.merged["attn1"] >= len(blocks) and stats.merged["ff"] >= len(blocks)
    assert not stats.passed
    assert out.shape == reference.shape and not torch.equal(out, reference)
    assert (out - reference).norm() < 0.2 * reference.norm()


@pytest.mark.parametrize("name", list(MODELS))
def test_a_call_that_merges_nothing_warns(name):
    """Settings that merge, a call that merges nothing: a TurboBypassWarning, never silence."""
    build, inputs = MODELS[name]
    model = build()
    x = inputs(1)
    with (
        ta.patched(model, ratio=0.5, sx=32, sy=32) as patch,  # windows larger than the grid
        pytest.warns(TurboBypassWarning, match="nothing was merged.*grid smaller"),
    ):
        run(model, x)
    assert not any(stats_of(patch).merged.values())


def test_a_unet_call_that_merges_nothing_warns_too():
    """tomesd's settings on SDXL (no attention at full resolution) merged nothing silently."""
    from turbo_eval.diffusion import tiny_unet_config

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**tiny_unet_config(sdxl=True, cross_attention_dim=32))
    latent = torch.randn(1, 4, 16, 16)
    text = torch.randn(1, 7, 32)
    added = {"text_embeds": torch.randn(1, 16), "time_ids": torch.zeros(1, 6)}
    with (
        ta.patched(unet.eval(), ratio_attn1=0.5, max_downsample=1),
        pytest.warns(TurboBypassWarning, match="nothing was merged"),
        torch.no_grad(),
    ):
        unet(latent, 10, text, added_cond_kwargs=added)


# --------------------------------------------------------------- tomesd's keyword
@pytest.mark.parametrize("name", list(MODELS))
def test_ratio_zero_is_bit_identical_and_remove_restores(name):
    build, inputs = MODELS[name]
    model = build()
    x = inputs(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = run(model, x)
    for zero in (0, 0.0):
        with ta.patched(model, ratio=zero) as patch:
            assert torch.equal(run(model, x), reference)
        assert not patch.settings.active
    patch = ta.apply(model, ratio=0.5)
    assert not torch.equal(run(model, x), reference)
    patch.configure(ratio=0)
    assert torch.equal(run(model, x), reference)
    patch.remove()
    assert torch.equal(run(model, x), reference)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_ratio_keyword_has_tomesds_meaning_on_unets():
    from turbo_eval.diffusion import tiny_unet_config

    torch.manual_seed(0)
    sd15 = diffusers.UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=32)).eval()
    sdxl = diffusers.UNet2DConditionModel(**tiny_unet_config(sdxl=True, cross_attention_dim=32))
    with ta.patched(sd15, ratio=0.4) as patch:  # SD 1.x default: self-attention only
        assert patch.settings.ratios == {"attn1": 0.4, "attn2": 0.0, "ff": 0.0}
    with ta.patched(sdxl, ratio=0.4) as patch:  # SDXL default merges all three
        assert patch.settings.ratios == {"attn1": 0.4, "attn2": 0.4, "ff": 0.4}
    with ta.patched(sdxl, ratio=0.4, ratio_ff=0.1) as patch:  # explicit beside it wins
        assert patch.settings.ratios == {"attn1": 0.4, "attn2": 0.4, "ff": 0.1}
        patch.configure(ratio=0.0)
        assert not patch.settings.active
    latent, text = torch.randn(1, 4, 16, 12), torch.randn(1, 7, 32)
    with torch.no_grad():
        reference = sd15(latent, 10, text).sample
        with ta.patched(sd15, ratio=0):
            assert torch.equal(sd15(latent, 10, text).sample, reference)
    for bad in (1.0, -0.1, "half"):
        with pytest.raises((ValueError, TypeError), match=r"ratio must be (in \[0, 1\)|a number)"):
            ta.apply(sd15, ratio=bad)
        assert not any(m._forward_pre_hooks for m in sd15.modules())


def test_ratio_zero_through_a_pipeline_is_bit_identical():
    from turbo_eval.diffusion import tiny_pipeline

    pipe = tiny_pipeline()
    call = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="pt")
    reference = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with ta.patched(pipe, ratio=0):
        assert torch.equal(
            pipe(**call, generator=torch.Generator().manual_seed(0)).images, reference
        )


# ------------------------------------------------------------------ batching, order
@pytest.mark.parametrize("name", list(MODELS))
def test_batch_rows_equal_single_rows(name):
    build, inputs = MODELS[name]
    model = build()
    x = inputs(3)
    # FLUX: rows with different plans run the attention group by group, each with its
    # own rotary rows (see test_flux_batch_rows_with_different_plans_equal_each_row_alone)
    with ta.patched(model, ratio=0.5, alpha=0.0) as patch:
        batched = run(model, x)
        for b in range(3):
            patch.new_generation()
            row = {
                k: v[b : b + 1]
                if isinstance(v, torch.Tensor) and k not in ("img_ids", "txt_ids")
                else v
                for k, v in x.items()
            }
            torch.testing.assert_close(run(model, row), batched[b : b + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_token_order_is_restored(name):
    build, inputs = MODELS[name]
    model = build()
    x = inputs(1)
    reference = run(model, x)
    with ta.patched(model, ratio=0.5) as patch:
        out = run(model, x)
    assert stats_of(patch).merged["ff"] > 0
    error = (out - reference).abs().mean()
    shifted = (reference.roll(1, dims=-1) - reference).abs().mean()
    assert error < 0.25 * shifted  # a token put one position off would cost `shifted`


# ------------------------------------------------------------------------ SD3 text
def test_sd3_text_stream_keeps_its_length_and_ff_context_never_merges():
    model = tiny_sd3()
    x = sd3_inputs(2)
    seen = {}
    block = model.transformer_blocks[0]

    def context_input(module, args):
        seen["ctx"] = args[0].shape

    def attention_output(module, args, output):
        seen["attn"] = (output[0].shape, output[1].shape)

    with ta.patched(model, ratio=0.5, use_rand=False) as patch:
        # registered after Turbo's hooks: they see what the block sees
        handles = [
            block.ff_context.register_forward_pre_hook(context_input),
            block.attn.register_forward_hook(attention_output),
        ]
        run(model, x)
    for handle in handles:
        handle.remove()
    assert stats_of(patch).merged["attn1"] == 2
    assert seen["ctx"][1] == 6  # the text tokens, all of them
    assert seen["attn"] == (torch.Size([2, 64, 16]), torch.Size([2, 6, 16]))  # restored


# --------------------------------------------------------------------- FLUX rotary
class Recording(CopyRestorer):
    def __init__(self) -> None:
        self.plans: list[MergePlan] = []

    def restore(self, y, plan):
        self.plans.append(plan)
        return super().restore(y, plan)


def test_flux_rotary_rows_follow_the_merge():
    """Oracle: the double block's attention run by hand on the merged tokens (a loop of
    group means), with rotary rows the model's own pos_embed computes from the kept
    tokens' ids; restored by copying each group's output."""
    model = tiny_flux().double()
    x = {k: v.double() if v.is_floating_point() else v for k, v in flux_inputs(1).items()}
    attn = model.transformer_blocks[0].attn
    captured = {}

    def keep_inputs(module, args, kwargs):
        captured.setdefault("kwargs", kwargs)

    handle = attn.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    recording = Recording()
    out = {}

    def attention_output(module, args, output):
        out.setdefault("y", output[0])

    with ta.patched(model, ratio=0.5, ratio_ff=0.0, restorer=recording):
        hook = attn.register_forward_hook(attention_output)  # after Turbo's restore
        run(model, x)
        hook.remove()
    handle.remove()
    kwargs = captured["kwargs"]  # the unmerged inputs (Turbo's pre-hook runs after ours)
    plan = recording.plans[0]
    image, text = kwargs["hidden_states"][0], kwargs["encoder_hidden_states"]
    groups: dict[int, list[int]] = {s: [int(t)] for s, t in enumerate(plan.kept_idx[0])}
    for t, s in zip(plan.merged_idx[0].tolist(), plan.merged_into[0].tolist(), strict=True):
        groups[s].append(t)
    merged = torch.stack([image[groups[s]].mean(0) for s in range(len(groups))])[None]
    img_ids, txt_ids = flux_ids(8, 8)
    ids = torch.cat([txt_ids, img_ids[plan.kept_idx[0]]]).double()
    rotary = model.pos_embed(ids)
    with torch.no_grad():
        y, _ = attn.processor(attn, merged, text, None, rotary)
    expected = torch.empty_like(image)
    for s, members in groups.items():
        for t in members:
            expected[t] = y[0, s]
    torch.testing.assert_close(out["y"][0], expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "settings",
    [{}, {"alpha": 0.1}, {"method": "toma"}],
    ids=["redundancy", "semantic", "toma"],
)
def test_flux_batch_rows_with_different_plans_equal_each_row_alone(settings):
    """Rows that keep different tokens need different rotary rows: the attention runs
    per group of rows, each with its own rows of the table. Oracle: each row alone."""
    model = tiny_flux()
    x = flux_inputs(2)  # two different latents
    recording = Recording()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TurboBypassWarning)
        with ta.patched(model, ratio=0.5, restorer=recording, **settings) as patch:
            batched = run(model, x)
            stats = stats_of(patch)
            for b in range(2):
                patch.new_generation()
                row = {
                    k: v[b : b + 1] if k not in ("img_ids", "txt_ids") else v for k, v in x.items()
                }
                alone = run(model, row)
                torch.testing.assert_close(alone, batched[b : b + 1], rtol=1e-4, atol=1e-5)
    # 1 double and 2 single blocks, every attention merged, none passed through
    assert stats.merged["attn1"] == 3 and not stats.passed
    if settings.get("method") != "toma":
        plan = recording.plans[0]  # the double block's attention
        assert plan.batch_size == 2 and not torch.equal(plan.kept_idx[0], plan.kept_idx[1])
    assert not torch.allclose(batched, run(model, x), atol=1e-6)  # merging acted


def test_flux_single_blocks_merge_only_the_image_part():
    model = tiny_flux()
    block = model.single_transformer_blocks[0]
    seen = []

    def attention_input(module, args, kwargs):
        seen.append(kwargs["hidden_states"].shape[1])

    with ta.patched(model, ratio=0.5, use_rand=False) as patch:
        handle = block.attn.register_forward_pre_hook(attention_input, with_kwargs=True)
        run(model, flux_inputs(1))
        handle.remove()
    assert stats_of(patch).merged["attn1"] == 3
    assert seen == [6 + 32]  # the six text tokens and half of the 64 image tokens


def test_flux_single_blocks_merge_once_and_restore_once(monkeypatch):
    """A single block is a chain: its normed input merges once (attn and proj_mlp keep
    merged outputs), proj_out reads the merged concatenation and restores once. Oracle:
    the same plans merged and restored around every slot apart (the unchained path)."""
    from turbo_adapters.families.stable_diffusion.hooks import DenoiserHooks

    model = tiny_flux().double()
    x = {k: v.double() if v.is_floating_point() else v for k, v in flux_inputs(1).items()}
    widths = []

    def sequence_length(module, args, output):
        widths.append((type(module).__name__, args[0].shape[1], output.shape[1]))

    blocks = model.single_transformer_blocks
    with ta.patched(model, ratio=0.5, use_rand=False) as patch:
        handles = [
            m.register_forward_hook(sequence_length)
            for b in blocks
            for m in (b.proj_mlp, b.proj_out)
        ]
        chained = run(model, x)
        for h in handles:
            h.remove()
    # after Turbo's hooks: proj_mlp runs on 6 text + 32 image tokens and stays merged;
    # proj_out reads the merged concatenation (no second merge) and restores 6 + 64
    assert widths == [("Linear", 38, 38), ("Linear", 38, 70)] * len(blocks)
    assert stats_of(patch).merged == {"attn1": 3, "attn2": 0, "ff": 3}
    monkeypatch.setattr(DenoiserHooks, "_chain", lambda *args, **kwargs: None)
    with ta.patched(model, ratio=0.5, use_rand=False) as patch:
        apart = run(model, x)
    assert stats_of(patch).merged["ff"] == 1 + 2 * len(blocks)  # proj_mlp and proj_out apart
    reference = run(model, x)
    assert not torch.allclose(chained, reference, atol=1e-6)
    torch.testing.assert_close(chained, apart, rtol=1e-12, atol=1e-12)


def test_flux_single_blocks_with_two_ratios_merge_each_slot_apart():
    model = tiny_flux()
    block = model.single_transformer_blocks[0]
    widths = []
    handle = block.proj_mlp.register_forward_hook(lambda m, args, out: widths.append(out.shape[1]))
    with ta.patched(model, ratio_attn1=0.5, ratio_ff=0.25, use_rand=False) as patch:
        out = run(model, flux_inputs(1))
    handle.remove()
    # this hook runs before Turbo's restore: 6 text + 48 image tokens at ratio_ff 0.25
    assert widths == [54] and out.shape == run(model, flux_inputs(1)).shape
    assert stats_of(patch).merged["ff"] == 1 + 2 * 2


# ------------------------------------------------------------------------ registry
def test_registry_names_and_pipeline_matching():
    for name, adapter in (
        ("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart"),
        ("stabilityai/stable-diffusion-3-medium-diffusers", "sd3"),
        ("stabilityai/stable-diffusion-3.5-large", "sd3"),
        ("black-forest-labs/FLUX.1-dev", "flux"),
        ("black-forest-labs/FLUX.1-schnell", "flux"),
    ):
        assert ta.get_adapter(name).name == adapter
    for name, (build, _) in MODELS.items():
        assert ta.adapter_for_model(build()).name == name.split(".")[0].replace("sd3", "sd3")


def test_r_and_kv_merge_are_refused_with_the_keywords_named():
    with pytest.raises(ValueError, match="merges by ratio, not r"):
        ta.apply(tiny_sd3(), r=4)
    with pytest.raises(ValueError, match="attn1_kv=True"):
        ta.apply(tiny_flux(), attn1_kv=True)


def test_sana_is_refused_with_its_reason():
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=8,
        sample_size=8,
        patch_size=1,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert ta.adapter_for_model(model).name == "sana"
    assert ta.get_adapter("Efficient-Large-Model/Sana_1600M_1024px_diffusers").name == "sana"
    with pytest.raises(TypeError, match=r"linear attention.*GLUMBConv"):
        ta.apply(model, ratio=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and not any(m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------ pipeline
def test_pixart_pipeline_cfg_pairs_share_one_plan_and_ratio_zero_is_identical():
    """Through PixArtSigmaPipeline (prompt embeddings given: no tokenizer offline)."""
    from support.tiny_dit import TEXT_DIM

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    pipe = diffusers.PixArtSigmaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=tiny_pixart(),
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    embeds = torch.randn(2, 6, TEXT_DIM, generator=g)
    negative = torch.randn(2, 6, TEXT_DIM, generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    call = dict(
        negative_prompt=None,
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=mask,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="pt",
        use_resolution_binning=False,
    )
    reference = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    recording = Recording()
    with ta.patched(pipe, ratio=0.5, attn1_kv=False, restorer=recording) as patch:
        out = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert patch.pipeline_cfg and patch.cond_rows == 2
    assert patch.last_stats["transformer"].merged == {"attn1": 2, "attn2": 0, "ff": 2}
    plan = recording.plans[0]
    assert plan.batch_size == 4 and torch.equal(plan.kept_idx[:2], plan.kept_idx[2:])
    assert not torch.equal(out, reference)
    with ta.patched(pipe, ratio=0):
        assert torch.equal(
            pipe(**call, generator=torch.Generator().manual_seed(0)).images, reference
        )


def _tiny_vae(latent_channels: int = 4):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        shift_factor=0.0,  # SD3 and FLUX pipelines read it
    )


def test_sd3_pipeline_cfg_pairs_share_one_plan_and_ratio_zero_is_identical():
    """Through StableDiffusion3Pipeline (prompt embeddings given: no text encoders offline)."""
    from support.tiny_dit import TEXT_DIM

    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    call = dict(
        prompt_embeds=torch.randn(2, 6, TEXT_DIM, generator=g),
        negative_prompt_embeds=torch.randn(2, 6, TEXT_DIM, generator=g),
        pooled_prompt_embeds=torch.randn(2, 8, generator=g),
        negative_pooled_prompt_embeds=torch.randn(2, 8, generator=g),
        num_inference_steps=2,
        guidance_scale=5.0,
        height=32,
        width=32,
        output_type="pt",
    )
    reference = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    recording = Recording()
    with ta.patched(pipe, ratio=0.5, restorer=recording) as patch:
        out = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert patch.pipeline_cfg and patch.cond_rows == 2
    assert patch.last_stats["transformer"].merged == {"attn1": 2, "attn2": 0, "ff": 2}
    plan = recording.plans[0]
    assert plan.batch_size == 4 and torch.equal(plan.kept_idx[:2], plan.kept_idx[2:])
    assert not torch.equal(out, reference)
    assert (out - reference).abs().mean() < 0.2 * reference.abs().mean()
    with ta.patched(pipe, ratio=0):
        again = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(again, reference)


def test_flux_pipeline_merges_and_ratio_zero_is_identical():
    """Through FluxPipeline (guidance embedding, no CFG; prompt embeddings given)."""
    from support.tiny_dit import TEXT_DIM

    pipe = diffusers.FluxPipeline(
        transformer=tiny_flux(guidance=True),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    call = dict(
        prompt_embeds=torch.randn(1, 6, TEXT_DIM, generator=g),
        pooled_prompt_embeds=torch.randn(1, 8, generator=g),
        num_inference_steps=2,
        guidance_scale=3.5,
        height=32,
        width=32,
        output_type="pt",
    )
    reference = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with warnings.catch_warnings():
        warnings.simplefilter("error", TurboBypassWarning)
        with ta.patched(pipe, ratio=0.5, use_rand=False) as patch:
            out = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    stats = patch.last_stats["transformer"]
    # 1 double + 2 single blocks; each single block's chain counts one ff merge
    assert stats.merged == {"attn1": 3, "attn2": 0, "ff": 3} and not stats.passed
    assert [n for _, n, _ in stats.tokens] == [64] * 3  # 32 px / 2 (VAE) / 2 (packing)
    assert not torch.equal(out, reference)
    assert (out - reference).abs().mean() < 0.2 * reference.abs().mean()
    with ta.patched(pipe, ratio=0):
        again = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(again, reference)
