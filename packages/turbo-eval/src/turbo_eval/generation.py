"""Text-to-image and image-to-image evaluation: fidelity to the unaccelerated pipeline.

Every method generates the same prompts with the same seeds as the unpatched
pipeline; always available: PSNR and SSIM of the decoded images and the MSE of the
final latents against the unpatched ones, images per second, and FLOPs of one
generation. FID and CLIP score only when the user supplies the networks locally
(no download): ``fid_features`` (any feature-extractor module, e.g. an Inception
loaded from a local file) with ``reference_images``, and ``clip_model`` (a local
directory holding a CLIP model and processor).

>>> results = evaluate_generation(pipe, {"unpatched": None, "turbo": {"ratio_attn1": 0.5}},
...                               prompts=["a cat"], steps=20)            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .measure import count_flops

__all__ = [
    "clip_score",
    "decode_latents",
    "evaluate_generation",
    "fid",
    "psnr",
    "psnr_per_image",
    "ssim",
    "ssim_per_image",
]


def psnr_per_image(images: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """PSNR in dB of each of ``(B, C, H, W)`` images in [0, 1] (an identical image: inf)."""
    _check_pair(images, reference)
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    return [math.inf if m == 0 else 10 * math.log10(1.0 / float(m)) for m in mse]


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR in dB of ``(B, C, H, W)`` images in [0, 1] (identical images: inf)."""
    values = psnr_per_image(images, reference)
    return sum(values) / len(values)


def ssim_per_image(images: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """SSIM (Gaussian window 11, sigma 1.5) of each of ``(B, C, H, W)`` images in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(images, reference)
    kernel = min(11, images.shape[-1], images.shape[-2])
    kernel -= 1 - kernel % 2  # odd
    values = structural_similarity_index_measure(
        images.double(), reference.double(), data_range=1.0, kernel_size=kernel, reduction="none"
    )
    return [float(v) for v in values.reshape(-1)]


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5) of ``(B, C, H, W)`` images in [0, 1]."""
    values = ssim_per_image(images, reference)
    return sum(values) / len(values)


def fid(images: torch.Tensor, reference_images: torch.Tensor, features: torch.nn.Module) -> float:
    """Frechet distance of ``features`` of two image sets (``(B, 3, H, W)`` in [0, 1]).

    ``features`` maps a float batch in [0, 1] to ``(B, D)`` features (and has
    ``num_features``): the user's own local Inception, say; torchmetrics'
    ``FrechetInceptionDistance`` takes it as the module, nothing is downloaded.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features, normalize=True)
    metric.update(reference_images.float(), real=True)
    metric.update(images.float(), real=False)
    return float(metric.compute())


def clip_score(images: torch.Tensor, prompts: Sequence[str], clip_model: str) -> float:
    """CLIP score (torchmetrics) of images against their prompts; ``clip_model`` is a
    local directory with a CLIP model and processor (``save_pretrained`` layout)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=clip_model)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return float(metric(list(pixels), list(prompts)))


def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> None:
    if images.shape != reference.shape or images.dim() != 4:
        raise ValueError(
            "images and reference must be (B, C, H, W) of the same shape, got "
            f"{tuple(images.shape)} and {tuple(reference.shape)}"
        )


@contextlib.contextmanager
def _method(pipe: Any, settings: Mapping[str, Any] | None) -> Iterator[None]:
    if settings is None:
        yield
        return
    import turbo_adapters

    patch = turbo_adapters.apply(pipe, **settings)
    try:
        yield
    finally:
        patch.remove()


def decode_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's VAE decoding of final latents: ``(B, 3, H, W)`` float32 in [0, 1]."""
    vae = pipe.vae
    scale = getattr(vae.config, "scaling_factor", 1.0)
    with torch.no_grad():
        images = vae.decode(latents.to(vae.device, vae.dtype) / scale).sample
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


def evaluate_generation(
    pipe: Any,
    methods: Mapping[str, Mapping[str, Any] | None],
    prompts: Sequence[str],
    *,
    steps: int = 20,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float = 7.5,
    init_images: torch.Tensor | None = None,
    strength: float = 0.6,
    flops: bool = True,
    progress: bool = True,
    fid_features: torch.nn.Module | None = None,
    reference_images: torch.Tensor | None = None,
    clip_model: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Generate ``prompts`` with every method and compare with the first (the reference).

    Args:
        pipe: a diffusers text-to-image (or, with ``init_images``, image-to-image) pipeline.
        methods: ``{name: turbo_adapters.apply keyword settings}``; None runs unpatched.
            The first method is the reference (usually ``{"unpatched": None}``).
        prompts: one image per prompt, prompt ``i`` seeded with ``seed + i``.
        steps, guidance_scale, height, width: passed to the pipeline.
        init_images: ``(len(prompts), 3, H, W)`` in [0, 1] for image-to-image, with ``strength``.
        flops: count the FLOPs of one generation of the first prompt per method.
        progress: progress bars over images (and the pipeline's over denoising steps).
        fid_features, reference_images: FID against these real images, when both given.
        clip_model: local CLIP directory for the CLIP score, when given.

    Returns:
        ``{method: {"psnr", "ssim", "latent_mse", "images_per_s", "seconds", "flops",
        "flops_ratio", "fid", "clip_score", "skipped"}}``; PSNR/SSIM/MSE compare with
        the reference method (its own: inf, 1, 0).
    """
    if not methods:
        raise ValueError("methods must name at least one method (the first is the reference)")
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    if init_images is not None and init_images.shape[0] != len(prompts):
        raise ValueError(
            f"init_images must hold one image per prompt ({len(prompts)}), "
            f"got {init_images.shape[0]}"
        )
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    base: dict[str, Any] = {
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "output_type": "latent",
    }
    if init_images is None:
        base.update(height=height, width=width)
    else:
        base["strength"] = strength

    def generate(index: int) -> torch.Tensor:
        call = dict(base, prompt=prompts[index])
        if init_images is not None:
            call["image"] = init_images[index : index + 1]
        generator = torch.Generator().manual_seed(seed + index)
        with torch.no_grad():
            return pipe(**call, generator=generator).images

    results: dict[str, dict[str, Any]] = {}
    reference: tuple[torch.Tensor, torch.Tensor] | None = None
    for name, settings in methods.items():
        with _method(pipe, settings):
            start = time.perf_counter()
            latents = torch.cat(
                [generate(i) for i in tqdm(range(len(prompts)), desc=name, disable=not progress)]
            )
            seconds = time.perf_counter() - start
            counted = count_flops(generate, 0) if flops else None
        images = decode_latents(pipe, latents)
        if reference is None:
            reference = (latents, images)
        row: dict[str, Any] = {
            "psnr": psnr(images, reference[1]),
            "ssim": ssim(images, reference[1]),
            "latent_mse": float((latents.double() - reference[0].double()).pow(2).mean()),
            "images_per_s": len(prompts) / seconds,
            "seconds": seconds,
            "flops": counted,
            "skipped": {},
        }
        if fid_features is not None and reference_images is not None:
            row["fid"] = fid(images, reference_images, fid_features)
        else:
            row["skipped"]["fid"] = "no local feature extractor and reference images given"
        if clip_model is not None:
            row["clip_score"] = clip_score(images, prompts, clip_model)
        else:
            row["skipped"]["clip_score"] = "no local CLIP model given"
        results[name] = row
    first = next(iter(results.values()))["flops"]
    for row in results.values():
        row["flops_ratio"] = first / row["flops"] if first and row["flops"] else None
    return results
