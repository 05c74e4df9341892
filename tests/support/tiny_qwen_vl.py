"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers 5) and their prompts, built in code.

Images of different sizes (dynamic resolution): a ``(t, h, w)`` patch grid each, 2x2
patches merged into one language-model token. Prompts are
``text <vision_start> <image_pad> * n <vision_end> text``, left padded, with the
``mm_token_type_ids`` the processor writes (1 at image placeholders).
"""

from __future__ import annotations

import torch
import transformers

IMG = 90
START = 91
END = 92
VIDEO = 93
TIME = 70  # timestamp tokens of Qwen3-VL frame groups: TIME + frame, SECONDS
SECONDS = 80
PAD = 0
VOCAB = 100
PATCH = 4
TEMPORAL = 2
MERGE = 2

KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _text(kind: str, layers: int) -> dict:
    section = [2, 1, 1] if kind == "qwen3_vl" else [1, 1, 2]
    return {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": VOCAB,
        "pad_token_id": PAD, "initializer_range": 0.1, "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": section},
    }  # fmt: skip


def _vision(kind: str) -> dict:
    common = {"depth": 3, "num_heads": 2, "patch_size": PATCH, "temporal_patch_size": TEMPORAL,
              "spatial_merge_size": MERGE, "in_channels": 3, "initializer_range": 0.2}  # fmt: skip
    if kind == "qwen2_vl":
        return {**common, "embed_dim": 16, "hidden_size": 32, "mlp_ratio": 2}
    if kind == "qwen2_5_vl":
        return {**common, "hidden_size": 16, "intermediate_size": 32, "out_hidden_size": 32,
                "window_size": 16, "fullatt_block_indexes": [1]}  # fmt: skip
    return {**common, "hidden_size": 16, "intermediate_size": 32, "out_hidden_size": 32,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]}  # fmt: skip


def build(kind: str = "qwen2_vl", layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """A tiny ``<Kind>ForConditionalGeneration`` in eval mode, informative random weights."""
    names = {
        "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
        "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
        "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    }
    config_cls, model_cls = (getattr(transformers, n) for n in names[kind])
    torch.manual_seed(seed)
    config = config_cls(
        text_config=_text(kind, layers), vision_config=_vision(kind), image_token_id=IMG,
        video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
    )  # fmt: skip
    model = model_cls(config).eval()
    with torch.no_grad():  # weights large enough that greedy answers vary between prompts
        for part in (model.model.language_model, model.lm_head):
            for weight in (p for p in part.parameters() if p.dim() == 2):
                weight.normal_(0.0, 1.2 / weight.shape[1] ** 0.5)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def tokens(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // MERGE**2


def feed(grids: list[list[tuple[int, int, int]]], seed: int = 1) -> dict[str, torch.Tensor]:
    """One row per entry of ``grids`` with that row's images (patch grids), left padded."""
    g = torch.Generator().manual_seed(seed)
    prompts, flat = [], []
    for b, row_grids in enumerate(grids):
        row = [1, 5 + b, 6]
        for i, grid in enumerate(row_grids):
            row += [START, *[IMG] * tokens(grid), END, 7 + i]
            flat.append(grid)
        prompts.append([*row, 8, 9 + b, 10 + b])
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    patches = sum(t * h * w for t, h, w in flat)
    pixels = torch.randn(patches, 3 * TEMPORAL * PATCH * PATCH, generator=g)
    return {
        "input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
        "image_grid_thw": torch.tensor(flat), "mm_token_type_ids": (ids == IMG).long(),
    }  # fmt: skip


def feed_media(
    rows: list[list[tuple[str, tuple[int, int, int]]]], seed: int = 1, frame_runs: bool = False
) -> dict:
    """One row per entry of ``rows``: its images and videos (``("image" | "video", grid)``)
    in prompt order, each in its own ``<vision_start> ... <vision_end>`` run, left padded,
    with ``mm_token_type_ids`` 1 at image and 2 at video placeholders (as the processor
    writes them). A video's grid ``(t, h, w)`` has ``t`` temporal patches of two frames.

    ``frame_runs``: Qwen3-VL's layout, each frame group of a video in a run of its own
    after a two-token timestamp (``<TIME + frame> <SECONDS> <vision_start> ...``)."""
    g = torch.Generator().manual_seed(seed)
    prompts, grids = [], {"image": [], "video": []}
    for b, media in enumerate(rows):
        row = [1, 5 + b, 6]
        for i, (kind, grid) in enumerate(media):
            if kind == "video" and frame_runs:
                t, h, w = grid
                for frame in range(t):
                    row += [TIME + frame, SECONDS, START, *[VIDEO] * tokens((1, h, w)), END]
                row.append(7 + i)
            else:
                row += [START, *[IMG if kind == "image" else VIDEO] * tokens(grid), END, 7 + i]
            grids[kind].append(grid)
        prompts.append([*row, 8, 9 + b, 10 + b])
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    out = {
        "input_ids": ids, "attention_mask": mask,
        "mm_token_type_ids": (ids == IMG).long() + 2 * (ids == VIDEO).long(),
    }  # fmt: skip
    for kind, pixels, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if grids[kind]:
            patches = sum(t * h * w for t, h, w in grids[kind])
            out[pixels] = torch.randn(patches, 3 * TEMPORAL * PATCH * PATCH, generator=g)
            out[grid] = torch.tensor(grids[kind])
    return out
