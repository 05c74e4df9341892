"""LLaVA-NeXT (transformers 5) with Turbo: LLM mode works, tower mode is refused by name.

Placeholder counts come from the model's own ``get_image_features`` (crops packed to
their grids plus newline tokens), so the prompts match what the processor writes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

import turbo_adapters as ta
from turbo_adapters.families.llava.llm import LLMReduction

IMG = 99
NEW = 5


@pytest.fixture(scope="module")
def model() -> LlavaNextForConditionalGeneration:
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
        vision_config=vision, text_config=text, image_token_id=IMG,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], projector_hidden_act="gelu",
    )  # fmt: skip
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        for part in (model.model.language_model, model.model.multi_modal_projector, model.lm_head):
            for weight in (p for p in part.parameters() if p.dim() == 2):
                weight.normal_(0.0, 1.2 / weight.shape[1] ** 0.5)
    model.generation_config.pad_token_id = 0
    return model


def feed(model, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    sizes = torch.tensor([[32, 64], [64, 32], [32, 32]][:batch])
    pixels = torch.randn(batch, 3, 3, 32, 32, generator=g)
    with torch.no_grad():
        packed = model.model.get_image_features(
            pixel_values=pixels, image_sizes=sizes
        ).pooler_output
    prompts = [[1, 5 + b, *[IMG] * len(f), 7, 8 + b] for b, f in enumerate(packed)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}


def generate(model, inputs, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kw
        )


def test_tower_mode_is_refused_with_the_reason(model) -> None:
    patch = ta.apply(model)
    try:
        assert patch.modes == frozenset({"llm"})  # the default where the tower cannot merge
        with pytest.raises(ValueError, match="pack_image_features"):
            patch.modes = "tower"
        with pytest.raises(ValueError, match="tower mode is not available"):
            generate(model, feed(model, 1), turbo_mode="both")
    finally:
        patch.remove()


def test_llm_keep_all_equals_unpatched_and_prune_completes(model) -> None:
    inputs = feed(model, 2)
    reference = generate(model, inputs)
    patch = ta.apply(model)
    try:
        patch.llm = LLMReduction(layer=1, keep=1.0)
        assert torch.equal(generate(model, inputs, turbo_mode="llm"), reference)
        patch.llm = LLMReduction(layer=1, keep=0.3, method="merge")
        out = generate(model, inputs, turbo_mode="llm")
    finally:
        patch.remove()
    assert out.shape == reference.shape
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
