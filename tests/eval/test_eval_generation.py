"""Generation fidelity on the tiny whole pipeline (text-to-image and image-to-image).

Oracles: the unpatched pipeline (reference row: PSNR inf, SSIM 1, MSE 0), a PSNR
computed by hand, and FID of an image set with itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

from turbo_eval.diffusion import tiny_pipeline
from turbo_eval.generation import evaluate_generation, fid, psnr, ssim


def test_text_to_image_fidelity_flops_and_skips():
    pipe = tiny_pipeline()
    results = evaluate_generation(
        pipe,
        {"unpatched": None, "turbo": {"ratio_attn1": 0.6, "ratio_ff": 0.5}},
        ["a cat", "a red dog"],
        steps=2,
        height=32,
        width=32,
        progress=False,
    )
    ref, turbo = results["unpatched"], results["turbo"]
    assert ref["psnr"] == math.inf and ref["ssim"] == pytest.approx(1.0)
    assert ref["latent_mse"] == 0.0
    assert math.isfinite(turbo["psnr"]) and 0 < turbo["ssim"] < 1 and turbo["latent_mse"] > 0
    assert turbo["flops_ratio"] > 1.05  # merging removes work
    assert set(turbo["skipped"]) == {"fid", "clip_score"}
    assert not any(m._forward_hooks for m in pipe.unet.modules())  # every method unpatched


def test_image_to_image_runs_and_validates():
    pipe = tiny_pipeline(kind="img2img")
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = evaluate_generation(
        pipe,
        {"unpatched": None, "same": None},
        ["a cat"],
        steps=3,
        init_images=init,
        flops=False,
        progress=False,
    )
    assert results["same"]["psnr"] == math.inf  # deterministic: same seed, same images
    with pytest.raises(ValueError, match="one image per prompt"):
        evaluate_generation(pipe, {"a": None}, ["x", "y"], init_images=init, progress=False)
    with pytest.raises(ValueError, match="methods must name"):
        evaluate_generation(pipe, {}, ["x"], progress=False)


def test_psnr_ssim_against_hand_computation():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    b = (a + 0.1).clamp(0, 1)
    mse = (a - b).pow(2).flatten(1).mean(1)
    expected = float((10 * torch.log10(1 / mse)).mean())
    assert psnr(b, a) == pytest.approx(expected, rel=1e-6)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(b, a) < 1.0
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:1])


class _TinyFeatures(nn.Module):
    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def test_fid_with_a_local_feature_module():
    torch.manual_seed(0)
    features = _TinyFeatures()
    images = torch.rand(12, 3, 16, 16)
    assert fid(images, images, features) == pytest.approx(0.0, abs=1e-6)
    assert fid(images * 0.2, images, features) > 1e-3
