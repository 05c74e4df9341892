"""Connector-kit cases (turbo_adapters.connector.testing) for LLaVA-1.5, LLaVA-NeXT and
Qwen2/2.5/3-VL, with feeds whose rows depend only on the row's id (so a row alone equals
the same row in a batch)."""

from __future__ import annotations

from typing import Any

import torch

from support import connector_methods, tiny_llava, tiny_prefix_vlms, tiny_qwen_vl
from turbo_adapters.connector.testing import ConnectorCase

# ------------------------------------------------------------------ LLaVA-1.5
LLAVA_IMAGES = {0: 1, 1: 2, 2: 1}  # images per row id


def llava_feed(rows: list[int]) -> dict[str, Any]:
    prompts, pixels = [], []
    for row in rows:
        ids = [1, 5 + row, 6]
        for i in range(LLAVA_IMAGES[row]):
            ids += [tiny_llava.IMG] * tiny_llava.PER_IMAGE + [7 + i]
            pixels.append(tiny_llava.pixels(1, seed=10 * row + i))
        prompts.append([*ids, 8, 9 + row] + [11] * row)  # rows of different lengths
    ids, mask = tiny_llava.left_pad(prompts)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels)}


def llava_tokens(rows: list[int]) -> list[int]:
    return [tiny_llava.PER_IMAGE] * sum(LLAVA_IMAGES[r] for r in rows)


LLAVA = ConnectorCase(
    "llava", tiny_llava.build, llava_feed, llava_tokens, connector_methods.STRIDED, budget=9
)

# ------------------------------------------------------------------ LLaVA-NeXT
NEXT_IMG = 99
NEXT_SIZES = {0: (32, 64), 1: (64, 32), 2: (32, 32)}


def build_next() -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
    from transformers import LlavaNextForConditionalGeneration as Next

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        vocab_size=100, pad_token_id=0,
    )  # fmt: skip
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=NEXT_IMG,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], projector_hidden_act="gelu",
    )  # fmt: skip
    model = Next(config).eval()
    with torch.no_grad():
        for part in (model.model.language_model, model.model.multi_modal_projector, model.lm_head):
            for weight in (p for p in part.parameters() if p.dim() == 2):
                weight.normal_(0.0, 1.2 / weight.shape[1] ** 0.5)
    model.generation_config.pad_token_id = 0
    return model


def _next_count(size: tuple[int, int]) -> int:
    """Packed tokens of one image (base 4x4 grid + the crops' grid with newline tokens)."""
    h, w = size
    base = (32 // 8) ** 2
    rows, cols = h // 32 * 4, w // 32 * 4
    return base + rows * (cols + 1)


def next_feed(rows: list[int]) -> dict[str, Any]:
    prompts, pixels, sizes = [], [], []
    for row in rows:
        size = NEXT_SIZES[row]
        prompts.append([1, 5 + row, *[NEXT_IMG] * _next_count(size), 7, 8 + row] + [11] * row)
        g = torch.Generator().manual_seed(20 + row)
        pixels.append(torch.randn(1, 3, 3, 32, 32, generator=g))
        sizes.append(size)
    ids, mask = tiny_llava.left_pad(prompts)
    return {
        "input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels),
        "image_sizes": torch.tensor(sizes),
    }  # fmt: skip


def next_tokens(rows: list[int]) -> list[int]:
    return [_next_count(NEXT_SIZES[r]) for r in rows]


LLAVA_NEXT = ConnectorCase(
    "llava-next", build_next, next_feed, next_tokens, connector_methods.STRIDED, budget=7
)

# ------------------------------------------------------------------ Qwen-VL
QWEN_GRIDS = {0: [(1, 4, 4)], 1: [(1, 4, 6), (1, 2, 4)], 2: [(1, 6, 4)]}


def qwen_feed(rows: list[int]) -> dict[str, Any]:
    """Rows by id: their images' grids, pixels seeded by the row."""
    feeds = [tiny_qwen_vl.feed([QWEN_GRIDS[r]], seed=30 + r) for r in rows]
    prompts = []
    for row, f in zip(rows, feeds, strict=True):
        prompt = f["input_ids"][0].tolist()
        prompts.append([prompt[0], 5 + row, *prompt[2:]] + [11] * row)
    ids, mask = tiny_llava.left_pad(prompts)
    return {
        "input_ids": ids, "attention_mask": mask,
        "pixel_values": torch.cat([f["pixel_values"] for f in feeds]),
        "image_grid_thw": torch.cat([f["image_grid_thw"] for f in feeds]),
        "mm_token_type_ids": (ids == tiny_qwen_vl.IMG).long(),
    }  # fmt: skip


def qwen_tokens(rows: list[int]) -> list[int]:
    return [tiny_qwen_vl.tokens(g) for r in rows for g in QWEN_GRIDS[r]]


QWEN = [
    ConnectorCase(
        kind,
        (lambda k=kind: tiny_qwen_vl.build(k)),
        qwen_feed,
        qwen_tokens,
        connector_methods.STRIDED,
        budget=3,
    )
    for kind in tiny_qwen_vl.KINDS
]

CASES = [LLAVA, LLAVA_NEXT, *QWEN]

# ------------------------------------------------- PaliGemma, Gemma 3, LLaVA-OneVision
SIGLIP_OFFLOAD = (
    "SigLIP's pooling head is an nn.MultiheadAttention, which reads its out_proj weight "
    "without calling out_proj: accelerate's cpu_offload leaves it on the meta device and "
    "the unpatched model fails"
)
PALIGEMMA = ConnectorCase(
    "paligemma",
    tiny_prefix_vlms.build_paligemma,
    tiny_prefix_vlms.paligemma_feed,
    lambda rows: [64] * len(rows),
    connector_methods.STRIDED,
    budget=10,
    offload=SIGLIP_OFFLOAD,
)
GEMMA3 = ConnectorCase(
    "gemma3",
    tiny_prefix_vlms.build_gemma3,
    tiny_prefix_vlms.gemma3_feed,
    lambda rows: [16] * sum({0: 1, 1: 2, 2: 1}[r] for r in rows),
    connector_methods.STRIDED,
    budget=5,
    offload=SIGLIP_OFFLOAD,
)
ONEVISION = ConnectorCase(
    "llava-onevision",
    tiny_prefix_vlms.build_onevision,
    tiny_prefix_vlms.onevision_feed,
    tiny_prefix_vlms.onevision_counts,
    connector_methods.STRIDED,
    budget=7,
    offload=SIGLIP_OFFLOAD,
)

IDEFICS3 = ConnectorCase(
    "idefics3",
    tiny_prefix_vlms.build_idefics3,
    tiny_prefix_vlms.idefics3_feed,
    tiny_prefix_vlms.idefics3_counts,
    connector_methods.STRIDED,
    budget=5,
    offload="the unpatched Idefics3 fails under cpu_offload (Tensor.item() on a meta tensor)",
)
SMOLVLM = ConnectorCase(
    "smolvlm",
    lambda: tiny_prefix_vlms.build_idefics3(smol=True),
    tiny_prefix_vlms.idefics3_feed,
    tiny_prefix_vlms.idefics3_counts,
    connector_methods.STRIDED,
    budget=5,
)
INTERNVL = ConnectorCase(
    "internvl",
    tiny_prefix_vlms.build_internvl,
    tiny_prefix_vlms.internvl_feed,
    tiny_prefix_vlms.internvl_counts,
    connector_methods.STRIDED,
    budget=5,
)

CASES += [PALIGEMMA, GEMMA3, ONEVISION, IDEFICS3, SMOLVLM, INTERNVL]
