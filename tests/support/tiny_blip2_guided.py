"""A tiny BLIP-2 / InstructBLIP whose Q-Former has cross-attention in layers 0 and 2, for
the text-guided (cross-modal) tests: the model, Q-Former words, prompts, ITM scores."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from .tiny_blip import peaked
from .tiny_blip2 import IMAGE_TOKEN, OPT, QUERIES, config

QFORMER_VOCAB = 60


def build(cls: str) -> nn.Module:
    torch.manual_seed(0)
    made = config("InstructBlipConfig" if cls.startswith("InstructBlip") else "Blip2Config", OPT)
    made.qformer_config.num_hidden_layers = 3
    made.qformer_config.cross_attention_frequency = 2  # cross-attention in layers 0 and 2
    made.qformer_config.use_qformer_text_input = cls == "Blip2ForImageTextRetrieval"
    model = peaked(getattr(transformers, cls)(made))
    assert [layer.has_cross_attention for layer in model.qformer.encoder.layer] == [1, 0, 1]
    return model


def words(batch: int, seed: int, length: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, QFORMER_VOCAB, (batch, length), generator=generator)


def prompt(batch: int, seed: int = 0) -> torch.Tensor:
    """Image placeholders, then text (the language model's prompt; ITM's text)."""
    return torch.cat([torch.full((batch, QUERIES), IMAGE_TOKEN), words(batch, seed, 5)], dim=1)


def itm(model: nn.Module, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return model(
        pixel_values=pixels, input_ids=ids, use_image_text_matching_head=True
    ).logits_per_image
