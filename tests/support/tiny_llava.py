"""A tiny LLaVA-1.5 (transformers 5) and its prompts, shared by the LLaVA tests.

Random weights scaled so that greedy answers differ between prompts; 64 image tokens per
image (CLS dropped); prompts left-padded.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMG = 99
PAD = 0
PER_IMAGE = 64  # (32 / 4) ** 2 patches, CLS dropped


def build(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        image_size=32, patch_size=4, initializer_range=0.2,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, pad_token_id=PAD, initializer_range=0.1,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMG,
        image_seq_length=PER_IMAGE, projector_hidden_act="gelu",
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # weights large enough that greedy answers vary between prompts
        for part in (model.model.language_model, model.model.multi_modal_projector, model.lm_head):
            for weight in (p for p in part.parameters() if p.dim() == 2):
                weight.normal_(0.0, 1.2 / weight.shape[1] ** 0.5)
    model.generation_config.pad_token_id = PAD
    return model


def rows(images: list[int], per_image: int = PER_IMAGE) -> list[list[int]]:
    """One prompt per row with ``images[b]`` images (text tokens differ per row)."""
    out = []
    for b, count in enumerate(images):
        row = [1, 5 + b, 6]
        for i in range(count):
            row += [IMG] * per_image + [7 + i]
        out.append([*row, 8, 9 + b])
    return out


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return ids, mask


def pixels(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
