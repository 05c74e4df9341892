"""Every VLM token-reduction method by name (``turbo_adapters.apply_vlm_method``): the names,
their stages and refusals, and that each one really shortens what the language model sees."""

from __future__ import annotations

import pytest
import torch
from support import tiny_llava
from transformers import LlavaForConditionalGeneration

import turbo_adapters
from turbo_adapters import VLM_METHODS, apply_vlm_method


def _shallow() -> LlavaForConditionalGeneration:  # the tiny LLaVA with 2 decoder layers
    config = tiny_llava.build().config
    config.text_config.num_hidden_layers = 2
    return LlavaForConditionalGeneration(config).eval()


def _last_layer_lengths(model: LlavaForConditionalGeneration) -> tuple[list[int], torch.Tensor]:
    """Sequence lengths entering the last decoder layer in one forward, and its logits."""
    seen: list[int] = []
    layer = model.model.language_model.layers[-1]
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    ids, mask = tiny_llava.left_pad(tiny_llava.rows([1]))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=tiny_llava.pixels(1))
    finally:
        handle.remove()
    return seen, logits.logits


def test_names_stages_and_refusals() -> None:
    model = tiny_llava.build()
    assert set(VLM_METHODS) == {
        "none", "turbo", "visionzip", "divprune", "cdpruner", "fastv", "pyramiddrop", "sparsevlm"
    }  # fmt: skip
    with pytest.raises(ValueError, match="method must be one of"):
        apply_vlm_method(model, "tome")
    with pytest.raises(ValueError, match="stage for method 'fastv' must be one of"):
        apply_vlm_method(model, "fastv", stage="connector")
    with pytest.raises(ValueError, match="budget must be"):
        apply_vlm_method(model, "divprune", budget=1.5)
    with pytest.raises(ValueError, match="needs at least 4 decoder layers"):
        apply_vlm_method(_shallow(), "pyramiddrop")
    assert apply_vlm_method(model, "none") is None
    assert turbo_adapters.handle_of(model) is None  # refusals left nothing behind


@pytest.mark.parametrize(
    ("method", "stage"), [(m, s) for m, stages in VLM_METHODS.items() for s in stages]
)
def test_each_method_shortens_the_prompt_and_remove_restores(method: str, stage: str) -> None:
    model = tiny_llava.build()
    plain_lengths, plain_logits = _last_layer_lengths(model)
    patch = apply_vlm_method(model, method, stage=stage, budget=0.5)
    assert patch is not None
    lengths, _ = _last_layer_lengths(model)
    # half the image's 64 tokens (or fewer, for staged methods) leave before the last layer
    assert lengths[0] <= plain_lengths[0] - tiny_llava.PER_IMAGE // 2
    patch.remove()
    again, logits = _last_layer_lengths(model)
    assert again == plain_lengths
    assert torch.equal(logits, plain_logits)
