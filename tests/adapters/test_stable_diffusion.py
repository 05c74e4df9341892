"""Stable Diffusion merge-and-restore on real diffusers classes with tiny configs.

Oracles: the unpatched UNet / pipeline (ratio 0, remove, pass-through cases), tomesd
0.1.3 (same windows, no semantic term), per-sample calls (batching), and an explicit
float64 loop for the text-to-image map.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import turbo_adapters as ta
from turbo_core import CopyRestorer, MergePlan

diffusers = pytest.importorskip("diffusers")
tomesd = pytest.importorskip("tomesd")

from turbo_adapters.families.stable_diffusion import RatioClippedWarning, StableDiffusionPatch  # noqa: E402
from turbo_adapters.families.stable_diffusion.guide import text_to_image_attention, text_token_mask  # noqa: E402
from turbo_eval.diffusion import (  # noqa: E402
    structured_latents,
    tiny_controlnet,
    tiny_pipeline,
    tiny_unet_config,
)

TEXT = 32


def make_unet(levels: int = 2, dtype: torch.dtype = torch.float32, **changes):
    config = tiny_unet_config(cross_attention_dim=TEXT)
    if levels == 3:  # attention at full and half resolution (max_downsample matters)
        config.update(
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
    config.update(changes)
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**config).to(dtype).eval()


def unet_inputs(batch=2, height=16, width=12, dtype=torch.float32, seed=0, text_seed=1):
    latent = structured_latents(batch, height, width, seed=seed).to(dtype)
    text = torch.randn(batch, 7, TEXT, generator=torch.Generator().manual_seed(text_seed))
    return latent, torch.tensor(10), text.to(dtype)


def run(unet, inputs, **kwargs):
    with torch.no_grad():
        return unet(*inputs, **kwargs).sample


# ------------------------------------------------------------------ tomesd equal
@pytest.mark.parametrize(
    ("components", "max_downsample", "grid"),
    [
        ({"merge_attn": True}, 1, (16, 12)),
        ({"merge_attn": True, "merge_crossattn": True, "merge_mlp": True}, 1, (16, 16)),
        ({"merge_attn": True, "merge_mlp": True}, 2, (16, 12)),
        ({"merge_attn": True}, 2, (14, 10)),  # windows do not tile the half-size grid
    ],
)
def test_equals_tomesd_without_semantics_or_randomness(components, max_downsample, grid):
    unet = make_unet(levels=3, dtype=torch.float64)
    inputs = unet_inputs(height=grid[0], width=grid[1], dtype=torch.float64)
    reference = run(unet, inputs)
    tomesd.apply_patch(unet, ratio=0.6, max_downsample=max_downsample, use_rand=False, **components)
    try:
        expected = run(unet, inputs)
    finally:
        tomesd.remove_patch(unet)
    ratios = {
        "ratio_attn1": 0.6 if components.get("merge_attn") else 0.0,
        "ratio_attn2": 0.6 if components.get("merge_crossattn") else 0.0,
        "ratio_ff": 0.6 if components.get("merge_mlp") else 0.0,
    }
    same = {"alpha": 0.0, "use_rand": False, "attn1_kv": False, "max_downsample": max_downsample}
    with ta.patched(unet, **same, **ratios) as p:
        got = run(unet, inputs)
    stats = p.last_stats["UNet2DConditionModel"]
    assert stats.merged["attn1"] > 0 and not stats.passed
    assert (expected - reference).abs().max() > 1e-3  # tomesd did merge
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# -------------------------------------------------------------- bit-for-bit cases
def test_ratio_zero_pipeline_is_bit_identical_and_remove_restores():
    pipe = tiny_pipeline()
    call = dict(prompt=["a cat", "a red dog"], num_inference_steps=3, height=32, width=32)
    gen = lambda: torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    reference = pipe(**call, generator=gen(), output_type="pt").images
    patch = ta.apply(pipe, ratio_attn1=0.0, alpha=1.0)
    assert isinstance(patch, StableDiffusionPatch)
    assert torch.equal(pipe(**call, generator=gen(), output_type="pt").images, reference)
    patch.configure(ratio_attn1=0.5, ratio_attn2=0.5, ratio_ff=0.5)
    merged = pipe(**call, generator=gen(), output_type="pt").images
    assert not torch.equal(merged, reference)
    assert patch.last_stats["unet"].merged == {"attn1": 3, "attn2": 3, "ff": 3}
    assert patch.text_mask is not None and patch.text_mask.shape == (2, 16)
    assert patch.text_mask.sum(1).tolist() == [6, 9]  # start, letters, end
    again = pipe(**call, generator=gen(), output_type="pt").images
    assert torch.equal(again, merged)  # seeded windows: a generation is reproducible
    patch.remove()
    assert "encode_prompt" not in pipe.__dict__ and not hasattr(pipe, "_turbo_handle")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in pipe.unet.modules())
    assert torch.equal(pipe(**call, generator=gen(), output_type="pt").images, reference)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in state.items())


def test_copying_a_patched_unet_says_to_remove_the_patch_first() -> None:
    """Its torch hooks live on the UNet's modules and lead to the patch: no silent copy."""
    unet = make_unet()
    ta.apply(unet)
    for attempt in (copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match=r"call turbo_adapters.remove\(model\) first"):
            attempt(unet)
    ta.remove(unet)
    twin = copy.deepcopy(unet)  # and once removed, the UNet copies as always
    assert ta.handle_of(twin) is None


def test_spatial_order_is_restored():
    unet = make_unet()
    inputs = unet_inputs(batch=1, height=24, width=24)
    reference = run(unet, inputs)
    with ta.patched(unet, ratio_attn1=0.7, ratio_attn2=0.7, ratio_ff=0.7) as p:
        out = run(unet, inputs)
    assert p.last_stats["UNet2DConditionModel"].merged["ff"] > 0
    assert out.shape == reference.shape
    error = (out - reference).abs().mean()
    shifted = (reference.roll(1, dims=-1) - reference).abs().mean()
    assert error < 0.25 * shifted  # a token put one position off would cost `shifted`


# ----------------------------------------------------------------------- batching
def test_odd_batch_elements_equal_single_calls():
    unet = make_unet()
    inputs = unet_inputs(batch=3)
    with ta.patched(unet, ratio_attn1=0.5, ratio_ff=0.3, alpha=0.5) as patch:
        batched = run(unet, inputs)
        for b in range(3):
            patch.new_generation()
            single = run(unet, tuple(t[b : b + 1] if t.dim() else t for t in inputs))
            torch.testing.assert_close(single, batched[b : b + 1], rtol=1e-4, atol=1e-5)


def test_cfg_halves_conditional_map_drives_both():
    unet = make_unet()
    latent, t, text = unet_inputs(batch=2)
    other_cond = text.clone()
    other_cond[1] = torch.randn(7, TEXT, generator=torch.Generator().manual_seed(9))
    other_uncond = text.clone()
    other_uncond[0] = torch.randn(7, TEXT, generator=torch.Generator().manual_seed(8))
    outputs = {}
    for cfg in (True, False):
        with ta.patched(unet, ratio_attn1=0.6, alpha=5.0, cfg_halves=cfg) as patch:
            for name, ctx in (("base", text), ("cond", other_cond), ("uncond", other_uncond)):
                patch.new_generation()
                outputs[cfg, name] = run(unet, (latent, t, ctx))
    # the unconditional half reads the conditional text's map only under CFG halves
    ref_free = run(unet, (latent, t, text))[0]
    assert not torch.allclose(outputs[True, "base"][0], outputs[True, "cond"][0])
    assert torch.equal(outputs[False, "base"][0], outputs[False, "cond"][0])
    # the conditional half never depends on the unconditional text
    assert torch.equal(outputs[True, "base"][1], outputs[True, "uncond"][1])
    assert not torch.equal(outputs[True, "base"][0], ref_free)


# ------------------------------------------------------------------ composition
def test_composes_with_slicing_and_classic_processor():
    from diffusers.models.attention_processor import AttnProcessor

    unet = make_unet()
    inputs = unet_inputs()
    settings = dict(ratio_attn1=0.5, ratio_attn2=0.5, alpha=0.5)
    with ta.patched(unet, **settings):
        expected = run(unet, inputs)
    unet.set_attention_slice(1)
    with ta.patched(unet, **settings) as patch:
        sliced = run(unet, inputs)
    assert patch.last_stats["UNet2DConditionModel"].merged["attn1"] == 3
    torch.testing.assert_close(sliced, expected, rtol=1e-4, atol=1e-5)
    unet.set_attn_processor(AttnProcessor())
    with ta.patched(unet, **settings):
        classic = run(unet, inputs)
    torch.testing.assert_close(classic, expected, rtol=1e-4, atol=1e-5)


def test_key_value_merge_is_closer_and_processor_independent():
    from diffusers.models.attention_processor import AttnProcessor

    unet = make_unet()
    inputs = unet_inputs()
    reference = run(unet, inputs)
    errors = {}
    for kv in (False, True):
        with ta.patched(unet, ratio_attn1=0.6, attn1_kv=kv, alpha=0.0) as patch:
            out = run(unet, inputs)
        assert patch.last_stats["UNet2DConditionModel"].merged["attn1"] == 3
        errors[kv] = (out - reference).abs().mean()
    assert errors[True] < 0.3 * errors[False]  # every query keeps its own output
    unet.set_attention_slice(1)
    with ta.patched(unet, ratio_attn1=0.6, attn1_kv=True, alpha=0.0):
        sliced = run(unet, inputs)
    unet.set_attn_processor(AttnProcessor())
    with ta.patched(unet, ratio_attn1=0.6, attn1_kv=True, alpha=0.0):
        classic = run(unet, inputs)
    torch.testing.assert_close(sliced, classic, rtol=1e-4, atol=1e-5)
    assert (sliced - reference).abs().mean() == pytest.approx(float(errors[True]), rel=1e-3)


def test_ratio_per_resolution():
    unet = make_unet(levels=3)  # attention at full and half resolution
    inputs = unet_inputs()
    reference = run(unet, inputs)
    with ta.patched(unet, ratio_attn1=0.5, ratio_ff=0.5, max_downsample=2):
        uniform = run(unet, inputs)
    # the same ratio given per resolution computes the same (keys as TOML writes them too)
    per_level = {"ratio_ff": {1: 0.5, "2": 0.5}, "ratio_attn1": {1: 0.5, 2: 0.5, 4: 0.9}}
    with ta.patched(unet, **per_level, max_downsample=2):
        assert torch.equal(run(unet, inputs), uniform)
    with ta.patched(unet, ratio_attn1=0.5, ratio_ff={2: 0.5}, max_downsample=2) as patch:
        half_only = run(unet, inputs)
    tokens = patch.last_stats["UNet2DConditionModel"].tokens
    assert sorted(n for _, n, _ in tokens) == [48] * 3 + [192] * 3
    for _, n, r in tokens:  # ff merges at half resolution only, attn1 everywhere
        assert r.get("ff", 0) == (24 if n == 48 else 0) and r["attn1"] == n // 2
    assert not torch.equal(half_only, uniform)
    # a resolution beyond max_downsample never merges
    with ta.patched(unet, ratio_attn1=0.0, ratio_ff={4: 0.5}, max_downsample=2) as patch:
        assert torch.equal(run(unet, inputs), reference)
    assert not patch.settings.active


@pytest.mark.parametrize("dim", [0, 1])
def test_chunked_feed_forward_passes_through_unmerged(dim):
    unet = make_unet()
    inputs = unet_inputs()
    with ta.patched(unet, ratio_attn1=0.5, ratio_ff=0.0):
        expected = run(unet, inputs)
    for module in unet.modules():
        if isinstance(module, diffusers.models.attention.BasicTransformerBlock):
            module.set_chunk_feed_forward(1 if dim == 0 else 16, dim)
    with ta.patched(unet, ratio_attn1=0.5, ratio_ff=0.5) as patch:
        got = run(unet, inputs)
    stats = patch.last_stats["UNet2DConditionModel"]
    assert stats.merged["ff"] == 0 and any(c == "ff" for _, c, _ in stats.passed)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_unet_called_with_sample_keyword():
    unet = make_unet()
    latent, t, text = unet_inputs()
    with ta.patched(unet, ratio_attn1=0.5) as patch, torch.no_grad():
        out = unet(sample=latent, timestep=t, encoder_hidden_states=text).sample
    assert patch.last_stats["UNet2DConditionModel"].merged["attn1"] == 3
    assert out.shape == latent.shape


# ------------------------------------------------------------- models and pipes
def test_controlnet_pipeline_patches_both_models():
    pipe = tiny_pipeline(kind="controlnet")
    call = dict(
        prompt="a cat",
        image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
        num_inference_steps=2,
        output_type="pt",
    )
    reference = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with ta.patched(pipe, ratio_attn1=0.5) as patch:
        out = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert set(patch.last_stats) == {"unet", "controlnet"}
    assert patch.last_stats["controlnet"].merged["attn1"] == 1
    assert not torch.equal(out, reference)
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, reference)


def test_controlnet_model_alone():
    controlnet = tiny_controlnet(make_unet())
    latent, t, text = unet_inputs(batch=1, height=16, width=16)
    cond = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        reference = controlnet(latent, t, text, cond, return_dict=False)[1]  # mid block
        with ta.patched(controlnet, ratio_attn1=0.5) as patch:
            out = controlnet(latent, t, text, cond, return_dict=False)[1]
    assert patch.last_stats["ControlNetModel"].merged["attn1"] == 1
    assert reference.abs().max() > 0 and not torch.equal(out, reference)


def test_sdxl_defaults_merge_where_tomesd_defaults_do_nothing():
    unet = make_unet(**tiny_unet_config(sdxl=True, cross_attention_dim=TEXT))
    latent, t, text = unet_inputs(height=16, width=16)
    added = {"text_embeds": torch.randn(2, 16), "time_ids": torch.zeros(2, 6)}
    reference = run(unet, (latent, t, text), added_cond_kwargs=added)
    tomesd.apply_patch(unet)
    try:
        tome = run(unet, (latent, t, text), added_cond_kwargs=added)
    finally:
        tomesd.remove_patch(unet)
    assert torch.equal(tome, reference)  # no attention at SDXL's full resolution
    with ta.patched(unet) as patch:
        out = run(unet, (latent, t, text), added_cond_kwargs=added)
    assert patch.settings.max_downsample == 4 and patch.settings.ratio_ff == 0.5
    assert patch.last_stats["UNet2DConditionModel"].merged["attn1"] > 0
    assert not torch.equal(out, reference)


def test_steps_switch_merges_only_chosen_steps():
    pipe = tiny_pipeline()
    seen = []
    with ta.patched(pipe, ratio_attn1=0.5, steps=[1]) as patch:
        # runs after the patch's own exit hook: last_stats is this call's
        hook = pipe.unet.register_forward_hook(
            lambda *_: seen.append(
                (patch.last_stats["unet"].step, patch.last_stats["unet"].merged["attn1"])
            )
        )
        for _ in range(2):  # a second generation counts from step 0 again
            pipe(prompt="a cat", num_inference_steps=3, height=32, width=32, output_type="pt")
        hook.remove()
    assert seen == [(0, 0), (1, 3), (2, 0)] * 2


def test_registry_names():
    for name in (
        "runwayml/stable-diffusion-v1-5",
        "stabilityai/stable-diffusion-2-1",
        "stabilityai/stable-diffusion-xl-base-1.0",
        "unet2dconditionmodel",
        "controlnetmodel",
    ):
        assert ta.get_adapter(name).name == "stable-diffusion"


def test_survives_accelerate_offload_hooks():
    accelerate = pytest.importorskip("accelerate")
    unet = make_unet()
    inputs = unet_inputs()
    with ta.patched(unet, ratio_attn1=0.5, ratio_ff=0.3, attn1_kv=True):
        expected = run(unet, inputs)
    accelerate.cpu_offload(unet, execution_device="cpu")
    with ta.patched(unet, ratio_attn1=0.5, ratio_ff=0.3, attn1_kv=True) as patch:
        got = run(unet, inputs)
    assert patch.last_stats["UNet2DConditionModel"].merged["ff"] == 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_two_threads_two_settings():
    import threading

    unets = [make_unet(), make_unet()]
    inputs = unet_inputs()
    settings = [{"ratio_attn1": 0.5}, {"ratio_attn1": 0.7, "ratio_ff": 0.4}]
    patches = [ta.apply(u, **s) for u, s in zip(unets, settings, strict=True)]
    expected = [run(u, inputs) for u in unets]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(i: int) -> None:
        for _ in range(3):
            patches[i].new_generation()
            results[i].append(run(unets[i], inputs))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in (0, 1):
        assert all(torch.equal(out, expected[i]) for out in results[i])
        patches[i].remove()
    assert not torch.equal(expected[0], expected[1])


# ------------------------------------------------------------ reporting, errors
def test_ratio_above_window_limit_is_reported():
    unet = make_unet()
    with (
        ta.patched(unet, ratio_attn1=0.9, use_rand=False) as patch,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        run(unet, unet_inputs())
    clipped = patch.last_stats["UNet2DConditionModel"].clipped
    assert clipped and clipped[0][2:] == (172, 144)  # 0.9 * 192 asked, 3/4 allowed
    assert any(issubclass(w.category, RatioClippedWarning) for w in caught)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio_attn1": 1.2}, r"ratio_attn1 must be in \[0, 1\)"),
        ({"ratio_ff": -0.1}, r"ratio_ff must be in \[0, 1\)"),
        ({"sx": 0}, "sx must be an int >= 1"),
        ({"max_downsample": 3}, "max_downsample must be one of 1, 2, 4, 8"),
        ({"r": 4}, "merges by ratio"),
        ({"text_reduce": "median"}, "text_reduce must be 'max' or 'mean'"),
        ({"steps": "all"}, "steps must be None"),
        ({"ratio_ff": {3: 0.5}}, r"ratio_ff keys must be downsamplings \[1, 2, 4, 8\]"),
        ({"ratio_ff": {4: 1.5}}, r"ratio_ff\[4\] must be in \[0, 1\)"),
    ],
)
def test_bad_settings_name_parameter_and_range(kwargs, message):
    unet = make_unet()
    with pytest.raises((ValueError, TypeError), match=message):
        ta.apply(unet, **kwargs)
    assert not any(m._forward_pre_hooks for m in unet.modules())  # nothing left behind


@pytest.mark.parametrize("role", ["scorer", "matcher"])
def test_ranking_roles_are_refused_not_ignored(role):
    from turbo_core import BipartiteMatcher, InformationScorer

    unet = make_unet()
    config = ta.resolve_config(None)
    impl = {"scorer": InformationScorer(config), "matcher": BipartiteMatcher()}[role]
    with pytest.raises(ValueError, match=f"the {role} role"):
        ta.apply(unet, ratio_attn1=0.5, **{role: impl})
    assert not any(m._forward_pre_hooks for m in unet.modules())  # nothing left behind
    patch = ta.apply(unet, ratio_attn1=0.5)
    with pytest.raises(ValueError, match="2-D window matching"):
        patch.configure(**{role: impl})
    patch.remove()


def test_sd_fast_preset_and_keywords_over_it():
    from turbo_adapters.families.stable_diffusion import PRESETS

    unet = make_unet()
    with ta.patched(unet, "sd-fast") as patch:
        run(unet, unet_inputs())
    fast = PRESETS["sd-fast"]
    assert {k: getattr(patch.settings, k) for k in fast} == fast
    # max_downsample 4: the full-resolution blocks and the mid block (8x6, where ff merges)
    assert patch.last_stats["UNet2DConditionModel"].merged == {"attn1": 4, "attn2": 4, "ff": 1}
    with ta.patched(unet, "SD-Fast", ratio_attn2=0.0, alpha=0.0) as patch:
        assert patch.settings.ratio_attn2 == 0.0 and patch.settings.sx == 4
        assert patch.alpha == 0.0
    with pytest.raises(ValueError, match="unknown preset 'sd-fast'"):
        ta.resolve_config("sd-fast")  # an adapter's preset, not a TurboConfig preset


def test_unsupported_target_says_so():
    with pytest.raises(TypeError, match="no Turbo adapter recognises"):
        ta.apply(torch.nn.Linear(2, 2), ratio_attn1=0.5)


# --------------------------------------------------------------- semantic guide
def test_text_to_image_map_matches_explicit_loop():
    unet = make_unet(dtype=torch.float64)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    image = torch.randn(2, 12, 32, dtype=torch.float64)
    text = torch.randn(2, 5, TEXT, dtype=torch.float64)
    keep = text_token_mask(2, 5, image.device, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert keep.tolist() == [[False, True, True, False, False], [False, True, True, True, True]]
    for reduce in ("max", "mean"):
        got = text_to_image_attention(attn, image, text, keep, reduce)
        q, k = attn.to_q(image), attn.to_k(text)
        heads, dim = attn.heads, q.shape[-1] // attn.heads
        for b in range(2):
            maps = []
            for j in range(5):
                if not keep[b, j]:
                    continue
                per_head = []
                for h in range(heads):
                    qh, kh = q[b, :, h * dim : (h + 1) * dim], k[b, j, h * dim : (h + 1) * dim]
                    per_head.append(torch.softmax(qh @ kh * dim**-0.5, dim=0))
                maps.append(torch.stack(per_head).mean(0))
            folded = torch.stack(maps).amax(0) if reduce == "max" else torch.stack(maps).mean(0)
            torch.testing.assert_close(got[b], folded * 12, rtol=1e-10, atol=1e-12)


class RecordingRestorer(CopyRestorer):
    """The copy restorer, keeping every plan it restored (which rows followed which)."""

    def __init__(self) -> None:
        self.plans: list[MergePlan] = []

    def restore(self, y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
        self.plans.append(plan)
        return super().restore(y, plan)


def test_plan_from_cond_one_plan_for_both_halves():
    """Under CFG halves the conditional half's tokens pick the plan both halves follow."""
    unet = make_unet()
    latent, t, text = unet_inputs(batch=2)
    latent = latent.clone()
    latent[0] = torch.randn(latent[0].shape, generator=torch.Generator().manual_seed(3))

    seen = {}
    outputs = {}
    for plan_from in ("each", "cond"):
        restorer = RecordingRestorer()
        settings = dict(ratio_attn1=0.6, attn1_kv=False, alpha=2.0, cfg_halves=True)
        settings["plan_from"] = plan_from
        with ta.patched(unet, restorer=restorer, **settings):
            outputs[plan_from] = run(unet, (latent, t, text))
        seen[plan_from] = restorer.plans
    assert len(seen["cond"]) == len(seen["each"]) > 0
    for each, cond in zip(seen["each"], seen["cond"], strict=True):
        # the conditional row's plan is its own either way; "cond" gives it to row 0 too
        assert torch.equal(cond.kept_idx[1], each.kept_idx[1])
        assert torch.equal(cond.kept_idx[0], cond.kept_idx[1])
        assert torch.equal(cond.merged_into[0], cond.merged_into[1])
    assert any(not torch.equal(p.kept_idx[0], p.kept_idx[1]) for p in seen["each"])
    torch.testing.assert_close(outputs["cond"][1], outputs["each"][1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs["cond"][0], outputs["each"][0])
    with pytest.raises(ValueError, match="plan_from must be 'cond' or 'each'"):
        ta.apply(unet, plan_from="both")


def test_controlnet_in_guess_mode_is_not_split_into_cfg_halves():
    """Guess mode runs the ControlNet on the conditional rows alone: no halves there."""
    pipe = tiny_pipeline(kind="controlnet")

    restorer = RecordingRestorer()
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with ta.patched(pipe, ratio_attn1=0.5, attn1_kv=False, restorer=restorer) as patch:
        pipe(
            prompt=["a cat", "a red dog"],
            image=image,
            guess_mode=True,
            num_inference_steps=1,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
        assert patch.cond_rows == 2 and patch.cfg_halves(4) and not patch.cfg_halves(2)
    by_batch = {plan.batch_size: plan for plan in restorer.plans}
    assert set(by_batch) == {2, 4}  # the ControlNet's conditional rows, the UNet's CFG batch
    unet_plan, controlnet_plan = by_batch[4], by_batch[2]
    assert torch.equal(unet_plan.kept_idx[0], unet_plan.kept_idx[2])  # one plan per pair
    assert not torch.equal(controlnet_plan.kept_idx[0], controlnet_plan.kept_idx[1])
