"""A tiny BLIP-2 / InstructBLIP (transformers) for the adapter tests: the configs of its
parts, the model with peaked random weights, images."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

from .tiny_blip import peaked

IMAGE, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 48, 4, 4


TOKENS = (IMAGE // PATCH) ** 2 + 1


QUERIES, IMAGE_TOKEN, LM_VOCAB = 4, 69, 70


VISION = dict(
    hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
    intermediate_size=2 * WIDTH, image_size=IMAGE, patch_size=PATCH, qkv_bias=True,
)  # fmt: skip


QFORMER = dict(
    vocab_size=60, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
    intermediate_size=2 * WIDTH, encoder_hidden_size=WIDTH, max_position_embeddings=40,
    cross_attention_frequency=1,
)  # fmt: skip


OPT = dict(
    model_type="opt", vocab_size=LM_VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
    bos_token_id=2, eos_token_id=2, pad_token_id=1,
)  # fmt: skip


T5 = dict(
    model_type="t5", vocab_size=LM_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
    num_heads=4, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, bos_token_id=2,
)  # fmt: skip


def config(cls: str = "Blip2Config", text: dict[str, Any] | None = None) -> Any:
    return getattr(transformers, cls)(
        vision_config=VISION, qformer_config=QFORMER, text_config=text or OPT,
        num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN,
    )  # fmt: skip


def build(cls: str, text: dict[str, Any] | None = None) -> nn.Module:
    torch.manual_seed(0)
    config_cls = "InstructBlipConfig" if cls.startswith("InstructBlip") else "Blip2Config"
    made = config(config_cls, text)
    made.qformer_config.use_qformer_text_input = cls == "Blip2ForImageTextRetrieval"
    if cls.endswith("VisionModel"):
        made = made.vision_config
    return peaked(getattr(transformers, cls)(made))


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(batch))
