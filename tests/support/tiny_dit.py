"""Tiny diffusers diffusion transformers (PixArt, SD3, SD3.5, FLUX) built in code, seeded.

Weights are random; ``scale_weights`` makes attention peaked enough that tokens differ
and merging changes the output visibly. Inputs are smooth latents (neighbours alike,
as in real latents) so that window matching has redundancy to find.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TEXT_DIM = 32
TEXT_LEN = 6


def _seeded(make: Any, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = make()
    for name, p in model.named_parameters():  # diffusers zero-inits the adaLN gates and outputs
        if p.dim() >= 1 and p.abs().sum() == 0:
            with torch.no_grad():
                p.normal_(0, 0.05 if "bias" in name else 0.1)
    return model.eval()


def tiny_pixart(seed: int = 0, sample_size: int = 16) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return _seeded(
        lambda: PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            cross_attention_dim=16,
            caption_channels=TEXT_DIM,
            sample_size=sample_size,
            patch_size=2,
            norm_num_groups=1,
        ),
        seed,
    )


def tiny_sd3(seed: int = 0, dual: bool = False, sample_size: int = 16) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return _seeded(
        lambda: SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=16,
            pooled_projection_dim=8,
            out_channels=4,
            pos_embed_max_size=32,
            dual_attention_layers=(0,) if dual else (),
            qk_norm="rms_norm" if dual else None,
        ),
        seed,
    )


def tiny_flux(seed: int = 0, guidance: bool = False) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return _seeded(
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=8,
            guidance_embeds=guidance,
            axes_dims_rope=(4, 6, 6),
        ),
        seed,
    )


def smooth_latents(
    batch: int, channels: int, height: int, width: int, seed: int = 0
) -> torch.Tensor:
    """Latents that vary slowly over the grid (bilinear upsampling of a coarse field)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, channels, max(height // 4, 1), max(width // 4, 1), generator=g)
    fine = nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
    return fine + 0.05 * torch.randn(batch, channels, height, width, generator=g)


def text(batch: int, seed: int = 1, length: int = TEXT_LEN) -> torch.Tensor:
    return torch.randn(batch, length, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def pixart_inputs(batch: int, height: int = 16, width: int = 16, seed: int = 0) -> dict[str, Any]:
    return dict(
        hidden_states=smooth_latents(batch, 4, height, width, seed),
        encoder_hidden_states=text(batch, seed + 1),
        timestep=torch.full((batch,), 10),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def sd3_inputs(batch: int, height: int = 16, width: int = 16, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed + 2)
    return dict(
        hidden_states=smooth_latents(batch, 4, height, width, seed),
        encoder_hidden_states=text(batch, seed + 1),
        pooled_projections=torch.randn(batch, 8, generator=g),
        timestep=torch.full((batch,), 10),
    )


def flux_ids(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(img_ids, txt_ids)`` as the FLUX pipeline makes them (rows, columns of the grid)."""
    img = torch.zeros(height, width, 3)
    img[..., 1] = torch.arange(height)[:, None]
    img[..., 2] = torch.arange(width)[None, :]
    return img.reshape(-1, 3), torch.zeros(TEXT_LEN, 3)


def flux_inputs(
    batch: int, height: int = 8, width: int = 8, seed: int = 0, guidance: bool = False
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed + 2)
    latents = smooth_latents(batch, 16, height, width, seed)
    img_ids, txt_ids = flux_ids(height, width)
    out = dict(
        hidden_states=latents.flatten(2).transpose(1, 2),  # (B, H*W, C), raster order
        encoder_hidden_states=text(batch, seed + 1),
        pooled_projections=torch.randn(batch, 8, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids,
        txt_ids=txt_ids,
    )
    if guidance:
        out["guidance"] = torch.full((batch,), 3.5)
    return out
