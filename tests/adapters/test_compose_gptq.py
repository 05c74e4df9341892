"""Turbo on the vision side of a stack whose language model is GPTQ-quantized (gptqmodel).

Runs in the ``gptq`` tox environment (gptqmodel 7.6, torch 2.13). A tiny LLaMA built
in code is quantized once per session on the CPU. Oracles: the same stack unpatched
(r = 0: identical logits and identical greedy generations), and the schedule
arithmetic for the image tokens that reach the language model (r > 0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
pytest.importorskip("gptqmodel")
transformers = pytest.importorskip("transformers")

import turbo_adapters as ta  # noqa: E402
from turbo_adapters.compose import gptq  # noqa: E402

VOCAB, HIDDEN, IMAGE, PATCH, VISION, DEPTH = 128, 64, 32, 8, 48, 3
TOKENS = (IMAGE // PATCH) ** 2 + 1
R = 3


def expected_counts(tokens: int, schedule: list[int]) -> list[int]:
    counts = []
    for r in schedule:
        tokens -= max(min(r, (tokens - 1) // 2), 0)
        counts.append(tokens)
    return counts


def llama_config() -> Any:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=3, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip


def save_tiny_llama(folder: Path) -> None:
    """A seeded LLaMA and a word-level tokenizer (gptqmodel loads both from a folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama_config()).eval().save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="w0", pad_token="w1", eos_token="w2", bos_token="w3"
    ).save_pretrained(folder)


@pytest.fixture(autouse=True, scope="module")
def _logs_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """gptqmodel writes ``logs/`` into the working directory: keep it out of the checkout."""
    before = Path.cwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(scope="module")
def quantized_folder(_logs_in_tmp: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gptq")
    save_tiny_llama(root / "dense")
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randint(4, VOCAB, (1, 32), generator=generator) for _ in range(4)]
    return gptq.quantize_gptq(root / "dense", root / "gptq", calibration, bits=4, group_size=32)


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


def test_llava_with_gptq_language_model_r0(quantized_folder: Path) -> None:
    """transformers' LLaVA with the quantized LLaMA in place of its language model;
    Turbo on its CLIP tower at r = 0 changes nothing (r > 0 needs the LLaVA adapter,
    which shortens the image placeholders: tested with that adapter)."""
    quantized = gptq.load_gptq(quantized_folder)
    config = transformers.LlavaConfig(
        vision_config=vision_tower().config, text_config=llama_config(), image_token_id=VOCAB - 1,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    torch.manual_seed(3)
    llava = transformers.LlavaForConditionalGeneration(config).eval()
    llava.model.language_model = quantized.model
    llava.lm_head = quantized.lm_head
    pixels, ids = inputs()
    prompt = torch.cat([torch.full((2, TOKENS), VOCAB - 1), ids], dim=1)
    with torch.no_grad():
        ref = llava.generate(
            input_ids=prompt, pixel_values=pixels, max_new_tokens=4, do_sample=False
        )
        patch = ta.apply(llava.model.vision_tower, r=0)
        got = llava.generate(
            input_ids=prompt, pixel_values=pixels, max_new_tokens=4, do_sample=False
        )
    assert torch.equal(got, ref)
    assert patch.last_state.token_counts == [TOKENS] * DEPTH
    assert gptq.gptq_linear_classes(llava)


def test_gptq_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8, got 5"):
        gptq.quantize_gptq(tmp_path, tmp_path / "out", [torch.zeros(1, 16)], bits=5)
    with pytest.raises(ValueError, match="calibration sequences need >= 10 tokens, got 4"):
        gptq.quantize_gptq(tmp_path, tmp_path / "out", [torch.zeros(1, 4)])
