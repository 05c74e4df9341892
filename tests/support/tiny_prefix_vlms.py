"""Tiny PaliGemma, Gemma 3 and LLaVA-OneVision (transformers 5), built in code, and their
prompts (rows by id: a row alone equals the same row in a batch)."""

from __future__ import annotations

from typing import Any

import torch
import transformers

from support import tiny_llava

IMG = 95
BOI = 96
EOI = 97
PAD = 0
VOCAB = 100


def _informative(model: torch.nn.Module, *parts: torch.nn.Module) -> None:
    with torch.no_grad():
        for part in parts:
            for weight in (p for p in part.parameters() if p.dim() == 2):
                weight.normal_(0.0, 1.2 / weight.shape[1] ** 0.5)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None


def _siglip(size: int = 32, patch: int = 4) -> dict:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": size, "patch_size": patch}  # fmt: skip


def build_paligemma(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    text = {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
            "head_dim": 8, "vocab_size": VOCAB, "pad_token_id": PAD,
            "tie_word_embeddings": False}  # fmt: skip
    config = transformers.PaliGemmaConfig(
        vision_config=_siglip(), text_config=text, image_token_index=IMG, projection_dim=32,
        hidden_size=32, vocab_size=VOCAB, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    _informative(
        model, model.model.language_model, model.model.multi_modal_projector, model.lm_head
    )
    return model


def build_gemma3(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
            "vocab_size": VOCAB, "pad_token_id": PAD, "sliding_window": 16,
            "query_pre_attn_scalar": 8, "tie_word_embeddings": False}  # fmt: skip
    config = transformers.Gemma3Config(
        vision_config=_siglip(), text_config=text, mm_tokens_per_image=16,
        image_token_index=IMG, boi_token_index=BOI, eoi_token_index=EOI,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    _informative(
        model, model.model.language_model, model.model.multi_modal_projector, model.lm_head
    )
    return model


def build_onevision(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    text = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": VOCAB, "pad_token_id": PAD}  # fmt: skip
    config = transformers.LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", **_siglip(32, 8)},
        text_config=text, image_token_index=IMG,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], vision_feature_layer=-1,
    )  # fmt: skip
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    _informative(
        model, model.model.language_model, model.model.multi_modal_projector, model.lm_head
    )
    return model


# ------------------------------------------------------------------ prompts
def _pixels(row: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(40 + row))


def paligemma_feed(rows: list[int]) -> dict[str, Any]:
    """PaliGemma: the image first (64 tokens), then the prompt; token_type_ids 0 (prefix)."""
    prompts = [[IMG] * 64 + [2, 5 + row, 6] + [11] * row + [1] for row in rows]
    ids, mask = tiny_llava.left_pad(prompts)
    pixels = torch.cat([_pixels(r, (1, 3, 32, 32)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "token_type_ids": torch.zeros_like(ids)}  # fmt: skip


def gemma3_feed(rows: list[int]) -> dict[str, Any]:
    """Gemma 3: ``<boi> <image> * 16 <eoi>`` inside the prompt; token_type_ids 1 at images."""
    images = {0: 1, 1: 2, 2: 1}
    prompts, pixels = [], []
    for row in rows:
        ids = [2, 5 + row]
        for i in range(images[row]):
            ids += [BOI, *[IMG] * 16, EOI, 7 + i]
            pixels.append(_pixels(10 * row + i, (1, 3, 32, 32)))
        prompts.append([*ids, 8, 9 + row] + [11] * row)
    ids, mask = tiny_llava.left_pad(prompts)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels),
            "token_type_ids": (ids == IMG).long()}  # fmt: skip


ONEVISION_SIZES = {0: (32, 64), 1: (64, 32), 2: (32, 32)}


def onevision_tokens(model: torch.nn.Module, rows: list[int]) -> list[int]:
    feed = _onevision_pixels(rows)
    with torch.no_grad():
        packed = model.model.get_image_features(**feed).pooler_output
    return [len(p) for p in packed]


def _onevision_pixels(rows: list[int]) -> dict[str, Any]:
    return {
        "pixel_values": torch.cat([_pixels(r, (1, 3, 3, 32, 32)) for r in rows]),
        "image_sizes": torch.tensor([ONEVISION_SIZES[r] for r in rows]),
    }


_ONEVISION_COUNTS: dict[int, int] = {}


def onevision_feed(rows: list[int]) -> dict[str, Any]:
    if not _ONEVISION_COUNTS:
        counts = onevision_tokens(build_onevision(), [0, 1, 2])
        _ONEVISION_COUNTS.update(enumerate(counts))
    prompts = [
        [1, 5 + row, *[IMG] * _ONEVISION_COUNTS[row], 7, 8 + row] + [11] * row for row in rows
    ]
    ids, mask = tiny_llava.left_pad(prompts)
    return {"input_ids": ids, "attention_mask": mask, **_onevision_pixels(rows)}


def onevision_counts(rows: list[int]) -> list[int]:
    onevision_feed([0])
    return [_ONEVISION_COUNTS[r] for r in rows]


# ------------------------------------------------- Idefics3 / SmolVLM, InternVL
def _llama_text() -> dict:
    return {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": VOCAB, "pad_token_id": PAD}  # fmt: skip


def build_idefics3(seed: int = 0, smol: bool = False) -> torch.nn.Module:
    """Idefics3 (or SmolVLM): 32 px tiles of 8x8 patches, pixel-shuffled 2x2: 16 tokens."""
    torch.manual_seed(seed)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 4}  # fmt: skip
    names = ("SmolVLMConfig", "SmolVLMForConditionalGeneration") if smol else (
        "Idefics3Config", "Idefics3ForConditionalGeneration")  # fmt: skip
    config = getattr(transformers, names[0])(
        vision_config=vision, text_config=_llama_text(), image_token_id=IMG, scale_factor=2,
    )  # fmt: skip
    model = getattr(transformers, names[1])(config).eval()
    _informative(model, model.model.text_model, model.model.connector, model.lm_head)
    return model


def idefics3_feed(rows: list[int]) -> dict[str, Any]:
    """``<fake> <image> * 16 <fake>`` per tile; rows with 1 or 2 tiles."""
    tiles = {0: 1, 1: 2, 2: 1}
    count = max(tiles[r] for r in rows)
    prompts, pixels = [], torch.zeros(len(rows), count, 3, 32, 32)
    for b, row in enumerate(rows):
        ids = [1, 5 + row]
        for i in range(tiles[row]):
            ids += [BOI, *[IMG] * 16, BOI, 7 + i]
            pixels[b, i] = _pixels(10 * row + i, (3, 32, 32))
        prompts.append([*ids, 8, 9 + row] + [11] * row)
    ids, mask = tiny_llava.left_pad(prompts)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def idefics3_counts(rows: list[int]) -> list[int]:
    """Idefics3's features come per row (all its tiles): one entry per row."""
    return [16 * {0: 1, 1: 2, 2: 1}[r] for r in rows]


def build_internvl(seed: int = 0, **fields: Any) -> torch.nn.Module:
    """InternVL: a 32 px tile of 8x8 patches, pixel-shuffled by 0.5: 16 tokens (``fields``:
    more InternVLConfig fields)."""
    torch.manual_seed(seed)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": [32, 32], "patch_size": [4, 4]}  # fmt: skip
    text = {**_llama_text(), "model_type": "qwen2"}
    config = transformers.InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=IMG, image_seq_length=16,
        downsample_ratio=0.5, tie_word_embeddings=False, **fields,
    )  # fmt: skip
    model = transformers.InternVLForConditionalGeneration(config).eval()
    _informative(
        model, model.model.language_model, model.model.multi_modal_projector, model.lm_head
    )
    return model


def internvl_feed(rows: list[int]) -> dict[str, Any]:
    tiles = {0: 1, 1: 2, 2: 1}
    prompts, pixels = [], []
    for row in rows:
        ids = [1, 5 + row]
        for i in range(tiles[row]):
            ids += [BOI, *[IMG] * 16, EOI, 7 + i]
            pixels.append(_pixels(10 * row + i, (1, 3, 32, 32)))
        prompts.append([*ids, 8, 9 + row] + [11] * row)
    ids, mask = tiny_llava.left_pad(prompts)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels)}


def internvl_counts(rows: list[int]) -> list[int]:
    return [16] * sum({0: 1, 1: 2, 2: 1}[r] for r in rows)
