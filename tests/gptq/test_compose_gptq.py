"""Turbo on the vision side of a hand-built stack whose language model is GPTQ-quantized.

Runs in the ``gptq`` tox environment (gptqmodel 7.6). The tiny LLaMA is quantized once
per session on the CPU (conftest). Oracles: the same stack unpatched (r = 0: identical
logits and identical greedy generations), and the schedule arithmetic for the image
tokens that reach the language model (r > 0). BLIP-2, LLaVA and MiniGPT-v2 on GPTQ
language models: test_gptq_vlms.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from tiny_lm import HIDDEN, VOCAB  # noqa: E402

import turbo_adapters as ta  # noqa: E402
from turbo_adapters.compose import gptq  # noqa: E402

IMAGE, PATCH, VISION, DEPTH = 32, 8, 48, 3
TOKENS = (IMAGE // PATCH) ** 2 + 1
R = 3


def expected_counts(tokens: int, schedule: list[int]) -> list[int]:
    counts = []
    for r in schedule:
        tokens -= max(min(r, (tokens - 1) // 2), 0)
        counts.append(tokens)
    return counts


def vision_tower() -> nn.Module:
    torch.manual_seed(1)
    config = transformers.CLIPVisionConfig(
        hidden_size=VISION, num_hidden_layers=DEPTH, num_attention_heads=4,
        intermediate_size=2 * VISION, image_size=IMAGE, patch_size=PATCH,
    )  # fmt: skip
    return transformers.CLIPVisionModel(config).eval()


class TinyVLM(nn.Module):
    """Vision tower -> projector -> image tokens before the prompt -> causal LM."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.vision = vision_tower()
        torch.manual_seed(2)
        self.projector = nn.Linear(VISION, HIDDEN)
        self.lm = lm

    def embeds(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        image = self.projector(self.vision(pixel_values=pixels).last_hidden_state)
        text = self.lm.get_input_embeddings()(ids)  # gptqmodel loads the LM in bfloat16
        return torch.cat([image.to(text.dtype), text], dim=1)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=self.embeds(pixels, ids)).logits.float()

    def generate(self, pixels: torch.Tensor, ids: torch.Tensor, new: int = 6) -> torch.Tensor:
        embeds = self.embeds(pixels, ids)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        return self.lm.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new, do_sample=False,
            pad_token_id=1,
        )  # fmt: skip


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=generator)
    return pixels, torch.randint(4, VOCAB, (2, 5), generator=generator)


def test_quantized_lm_holds_gptq_linear_layers(quantized_folder: Path) -> None:
    lm = gptq.load_gptq(quantized_folder)
    assert gptq.gptq_linear_classes(lm)  # e.g. TorchAtenLinear / TorchQuantLinear
    assert not any(type(m) is nn.Linear for m in lm.model.layers.modules())


def test_turbo_on_the_vision_tower_of_a_gptq_stack(quantized_folder: Path) -> None:
    vlm = TinyVLM(gptq.load_gptq(quantized_folder))
    pixels, ids = inputs()
    with torch.no_grad():
        ref_logits, ref_tokens = vlm(pixels, ids), vlm.generate(pixels, ids)
        patch = ta.apply(vlm.vision, r=0)
        torch.testing.assert_close(vlm(pixels, ids), ref_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(vlm.generate(pixels, ids), ref_tokens)
        patch.r = R
        logits = vlm(pixels, ids)
        counts = patch.last_state.token_counts
        tokens = vlm.generate(pixels, ids)
    assert counts == expected_counts(TOKENS, [R] * DEPTH)
    assert logits.shape[1] == counts[-1] + ids.shape[1]  # fewer image tokens reach the LM
    assert torch.isfinite(logits).all() and tokens.shape == (2, 6)
    patch.remove()
    with torch.no_grad():
        torch.testing.assert_close(vlm(pixels, ids), ref_logits, atol=0, rtol=0)


def test_gptq_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8, got 5"):
        gptq.quantize_gptq(tmp_path, tmp_path / "out", [torch.zeros(1, 16)], bits=5)
    with pytest.raises(ValueError, match="calibration sequences need >= 10 tokens, got 4"):
        gptq.quantize_gptq(tmp_path, tmp_path / "out", [torch.zeros(1, 4)])


def test_attach_gptq_finds_the_language_model_or_says_why(quantized_folder: Path) -> None:
    from tiny_lm import llama_config

    quantized = gptq.load_gptq(quantized_folder)
    dense = transformers.LlamaForCausalLM(llama_config())
    assert gptq.language_model_of(dense)[0] == "whole"
    assert gptq.attach_gptq(dense, quantized) is quantized  # the whole model is the LM
    with pytest.raises(TypeError, match="cannot find the language model of TinyVLM"):
        gptq.attach_gptq(TinyVLM(dense), quantized)
    narrow = transformers.LlavaConfig(
        vision_config=vision_tower().config,
        text_config=transformers.LlamaConfig(
            hidden_size=32, num_attention_heads=4, vocab_size=VOCAB
        ),
    )
    with pytest.raises(
        ValueError,
        match="the GPTQ model has hidden_size=64, the model's language model hidden_size=32",
    ):
        gptq.attach_gptq(transformers.LlavaForConditionalGeneration(narrow), quantized)
