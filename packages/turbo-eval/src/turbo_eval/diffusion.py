"""Stable Diffusion models built in code: the real UNet configs and a tiny whole pipeline.

No weights are downloaded. ``sd15_unet_config`` / ``sdxl_unet_config`` are the
published configs of SD 1.5 and SDXL base (random weights stand in for the real ones
in speed and fidelity-to-unpatched measurements). ``tiny_pipeline`` builds a complete
text-to-image pipeline (UNet, VAE, CLIP text encoder and a tokenizer over a tiny
vocabulary) so the whole path runs in tests in seconds; ``sd15_random_pipeline`` is the
same at SD 1.5's full size (every network at its published config, random weights).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "sd15_random_pipeline",
    "sd15_unet_config",
    "sdxl_added_cond",
    "sdxl_unet_config",
    "structured_latents",
    "tiny_controlnet",
    "tiny_pipeline",
    "tiny_tokenizer",
    "tiny_unet_config",
]

#: Pipeline kinds the builders here make.
KINDS = ("text2img", "img2img", "controlnet")


def sd15_unet_config() -> dict[str, Any]:
    """``runwayml/stable-diffusion-v1-5`` UNet (860 M parameters)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
    }


def sdxl_unet_config() -> dict[str, Any]:
    """``stabilityai/stable-diffusion-xl-base-1.0`` UNet (2.6 B parameters)."""
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def sdxl_added_cond(batch: int, height: int, width: int, device: Any = None) -> dict[str, Any]:
    """SDXL's extra conditioning (pooled text embedding and size/crop ids), random text."""
    text = torch.randn(batch, 1280, device=device, generator=None)
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
    return {"text_embeds": text, "time_ids": ids.expand(batch, -1)}


def tiny_unet_config(sdxl: bool = False, cross_attention_dim: int = 32) -> dict[str, Any]:
    """A UNet of the same structure as SD 1.5 (or SDXL) with a few thousand parameters."""
    config: dict[str, Any] = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }
    if sdxl:
        config.update(
            block_out_channels=(16, 32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2),
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 16,
        )
    return config


def sd15_vae_config() -> dict[str, Any]:
    """SD 1.x's ``AutoencoderKL`` (84 M parameters, 8x downsampling)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def sd15_text_config() -> dict[str, Any]:
    """CLIP ViT-L/14's text encoder as SD 1.x uses it (123 M parameters, 77 tokens).

    The special token ids are those of :func:`tiny_tokenizer` (the real vocabulary is
    not available offline); the width, depth and length are the published ones.
    """
    return {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


def _ddim(**changes: Any) -> Any:
    """SD's noise schedule with the deterministic DDIM sampler."""
    import diffusers

    settings = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "clip_sample": False,
        **changes,
    }
    return diffusers.DDIMScheduler(**settings)


def sd15_random_pipeline(seed: int = 0, kind: str = "text2img", dtype: Any = None) -> Any:
    """A full-size SD 1.5 pipeline with random weights (UNet, VAE, text encoder at their
    published configs; a letter tokenizer with 77 positions; DDIM, deterministic).

    The cost of every network is the real one, so FLOPs, speed and fidelity to the
    unpatched pipeline measure what they would on the real model, minus what trained
    weights change (how redundant the features are). About 4.3 GB in float32.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    parts: dict[str, Any] = {
        "unet": diffusers.UNet2DConditionModel(**sd15_unet_config()),
        "vae": diffusers.AutoencoderKL(**sd15_vae_config()),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**sd15_text_config())),
        "tokenizer": tiny_tokenizer(max_length=77),
        "scheduler": _ddim(set_alpha_to_one=False),
    }
    pipe = _assemble(parts, kind)
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    return pipe


def _assemble(parts: dict[str, Any], kind: str) -> Any:
    """A Stable Diffusion pipeline of ``kind`` from its parts (no safety checker)."""
    import diffusers

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    parts = {**parts, "safety_checker": None, "feature_extractor": None}
    parts["requires_safety_checker"] = False
    if kind == "controlnet":
        parts["controlnet"] = tiny_controlnet(parts["unet"])
        pipe = diffusers.StableDiffusionControlNetPipeline(**parts)
    elif kind == "img2img":
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**parts)
    else:
        pipe = diffusers.StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_tokenizer(max_length: int = 16) -> Any:
    """A CLIP tokenizer over letters (one token per letter), built in code."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def structured_latents(
    batch: int, height: int, width: int, seed: int = 0, channels: int = 4
) -> torch.Tensor:
    """Latents with spatial structure (smooth blobs plus noise), as mid-denoising.

    White noise has no redundancy to merge; real latents do. Upsampled coarse noise
    plus a little fine noise stands in for them where no real image is at hand.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(
        batch, channels, max(height // 8, 1), max(width // 8, 1), generator=generator
    )
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic")
    return smooth + 0.3 * torch.randn(batch, channels, height, width, generator=generator)


def _tiny_text_encoder(seed: int, hidden: int = 32) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_pipeline(seed: int = 0, kind: str = "text2img") -> Any:
    """A complete tiny Stable Diffusion pipeline (random weights, CPU, float32).

    ``kind``: ``"text2img"`` (``StableDiffusionPipeline``), ``"img2img"``
    (``StableDiffusionImg2ImgPipeline``) or ``"controlnet"``
    (``StableDiffusionControlNetPipeline`` with a ControlNet made from the UNet).
    The VAE downsamples by 2: 32x32 px images have 16x16 latents.
    """
    import diffusers

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**tiny_unet_config())
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    parts = {
        "unet": unet,
        "vae": vae,
        "text_encoder": _tiny_text_encoder(seed),
        "tokenizer": tiny_tokenizer(),
        "scheduler": _ddim(),
    }
    return _assemble(parts, kind)


def tiny_controlnet(unet: Any) -> Any:
    """A ControlNet copied from ``unet`` with a small conditioning embedding.

    Its zero-initialised output convolutions get small random weights (seed 0), so the
    ControlNet's residuals are not all zero and a change inside it shows.
    """
    import diffusers

    controlnet = diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 16)
    ).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(0.1 * torch.randn(conv.weight.shape, generator=generator))
    return controlnet
