"""BLIP-2, LLaVA and MiniGPT-v2 whose language model is GPTQ-quantized, with Turbo.

The tiny OPT and LLaMA are quantized once per session (conftest) and put where each
model's language model was. Oracles: the same quantized model unpatched (r = 0:
identical greedy ids and logits), the schedule arithmetic for the tokens the vision
tower keeps, and for LLaVA the prompt the adapter hands to the language model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from tiny_lm import IMAGE_TOKEN, PAD, VOCAB, llama_config, opt_config  # noqa: E402

import turbo_adapters as ta  # noqa: E402
from turbo_adapters.compose import gptq  # noqa: E402

NEW = 5


def expected_counts(tokens: int, schedule: list[int]) -> list[int]:
    counts = []
    for r in schedule:
        tokens -= max(min(r, (tokens - 1) // 2), 0)
        counts.append(tokens)
    return counts


@torch.no_grad()
def peaked(model: nn.Module, seed: int, skip: str) -> nn.Module:
    """Random weights with peaked attention in the float parts (not under ``skip``): the
    library's init gives near-uniform attention, which would hide errors in q and k."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith(skip) or p.dim() < 2 or "embed" in name:
            continue
        gain = 3.0 if name.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight")) else 1.0
        p.copy_(torch.randn(p.shape, generator=generator) * gain / p.shape[-1] ** 0.5)
    return model.eval()


def images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def assert_gptq(model: nn.Module) -> None:
    assert gptq.gptq_linear_classes(model), "the language model lost its GPTQ layers"


# ------------------------------------------------------------------ BLIP-2 (OPT)
B2_IMAGE, B2_PATCH, B2_DEPTH, QUERIES = 32, 8, 4, 4
B2_TOKENS = (B2_IMAGE // B2_PATCH) ** 2 + 1


def blip2(folder: Path) -> nn.Module:
    """A tiny ``Blip2ForConditionalGeneration`` whose OPT is the GPTQ one."""
    vision = dict(
        hidden_size=48, num_hidden_layers=B2_DEPTH, num_attention_heads=4, intermediate_size=96,
        image_size=B2_IMAGE, patch_size=B2_PATCH, qkv_bias=True,
    )  # fmt: skip
    qformer = dict(
        vocab_size=60, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, encoder_hidden_size=48, max_position_embeddings=40,
    )  # fmt: skip
    config = transformers.Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=opt_config().to_dict(),
        num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN,
    )  # fmt: skip
    torch.manual_seed(0)
    model = peaked(transformers.Blip2ForConditionalGeneration(config), 0, "language_model")
    attached = gptq.attach_gptq(model, gptq.load_gptq(folder))
    assert attached is model and gptq.language_model_of(model)[0] == "causal"
    return model.eval()


def blip2_prompt(batch: int) -> torch.Tensor:
    """Query placeholders, then a few text tokens (what the processor makes)."""
    text = torch.randint(4, VOCAB - 1, (batch, 5), generator=torch.Generator().manual_seed(batch))
    return torch.cat([torch.full((batch, QUERIES), IMAGE_TOKEN), text], dim=1)


@torch.no_grad()
def test_blip2_with_gptq_opt(quantized_opt_folder: Path) -> None:
    model = blip2(quantized_opt_folder)
    assert_gptq(model.language_model)
    pixels, prompt = images(3, B2_IMAGE), blip2_prompt(3)
    # greedy: gptqmodel's loader sets do_sample=True in the LM's generation config
    greedy = model.generate(pixel_values=pixels, max_new_tokens=NEW, do_sample=False)
    logits = model(pixel_values=pixels, input_ids=prompt).logits
    assert len(set(greedy[:, -NEW:].flatten().tolist())) > 2  # answers depend on the input
    patch = ta.apply(model, r=0)
    assert patch.adapter_name == "hf-blip2"
    assert torch.equal(
        model.generate(pixel_values=pixels, max_new_tokens=NEW, do_sample=False), greedy
    )
    torch.testing.assert_close(
        model(pixel_values=pixels, input_ids=prompt).logits, logits, atol=1e-5, rtol=1e-5
    )
    assert patch.last_state.token_counts == [B2_TOKENS] * B2_DEPTH

    patch.r = 3
    seen: list[int] = []  # image tokens the Q-Former cross-attends to, per call
    hook = model.qformer.register_forward_hook(
        lambda _m, _a, kw, _o: seen.append(kw["encoder_hidden_states"].shape[1]),
        with_kwargs=True,
    )
    counts = expected_counts(B2_TOKENS, [3] * B2_DEPTH)
    for batch in (1, 3):
        out = model.generate(
            pixel_values=pixels[:batch], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
        )
        assert out.shape == (batch, QUERIES + 1 + NEW)  # placeholders, BOS, the answer
        assert patch.last_state.token_counts == counts
    hook.remove()
    assert seen == [counts[-1]] * 2 and counts[-1] < B2_TOKENS
    patch.remove()
    assert torch.equal(
        model.generate(pixel_values=pixels, max_new_tokens=NEW, do_sample=False), greedy
    )


# ---------------------------------------------------------------- LLaVA (LLaMA)
LV_IMAGE, LV_PATCH = 32, 8
PER_IMAGE = (LV_IMAGE // LV_PATCH) ** 2  # CLS dropped by the "default" strategy


def llava(folder: Path) -> nn.Module:
    """A tiny ``LlavaForConditionalGeneration`` whose LLaMA is the GPTQ one."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=LV_IMAGE, patch_size=LV_PATCH,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=llama_config(), image_token_id=IMAGE_TOKEN,
        image_seq_length=PER_IMAGE, projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = peaked(transformers.LlavaForConditionalGeneration(config), 0, "model.language_model")
    quantized = gptq.load_gptq(folder)
    gptq.attach_gptq(model, quantized)
    assert model.model.language_model is quantized.model and model.lm_head is quantized.lm_head
    model.generation_config.pad_token_id = PAD
    return model.eval()


def llava_prompts(batch: int, per_image: int = PER_IMAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """One image per row, text of different lengths around it, left-padded."""
    rows = [[3, 5 + b, *[IMAGE_TOKEN] * per_image, *range(8, 10 + 2 * b)] for b in range(batch)]
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), PAD)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    return ids, mask


def llava_generate(model: nn.Module, batch: int, **kw: Any) -> torch.Tensor:
    ids, mask = llava_prompts(batch)
    return model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=images(batch, LV_IMAGE),
        max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kw,
    )  # fmt: skip


@torch.no_grad()
def test_llava_with_gptq_llama(quantized_folder: Path) -> None:
    from turbo_adapters.families.llava.llm import LLMReduction

    model = llava(quantized_folder)
    assert_gptq(model)
    ids, mask = llava_prompts(2)
    pixels = images(2, LV_IMAGE)
    greedy = {b: llava_generate(model, b) for b in (1, 2)}
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert len(set(greedy[2][:, -NEW:].flatten().tolist())) > 2
    patch = ta.apply(model, r=0)
    assert patch.adapter_name == "llava" and patch.modes == {"tower"}
    for b in (1, 2):
        assert torch.equal(llava_generate(model, b), greedy[b])
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, logits,
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
    patch.llm = LLMReduction(layer=1, keep=1.0)  # LLM mode on the GPTQ layers, nothing cut
    assert torch.equal(llava_generate(model, 2, turbo_mode="llm"), greedy[2])

    # tower mode at r > 0: 2 of the 3 CLIP layers reach the feature layer (-2)
    patch.r = 3
    merged = expected_counts(PER_IMAGE + 1, [3, 3])[-1] - 1  # CLS dropped
    for b in (1, 2):
        out = llava_generate(model, b)
        assert out.shape == greedy[b].shape  # the caller's prompt, then NEW tokens
        assert torch.equal(out[:, :-NEW], greedy[b][:, :-NEW])
    short = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert short.shape[1] == ids.shape[1] - (PER_IMAGE - merged)  # fewer image tokens
    assert torch.isfinite(short).all()

    # LLM mode at keep < 1: image tokens dropped inside the quantized decoder
    patch.llm = LLMReduction(layer=1, keep=0.5)
    for b in (1, 2):
        out = llava_generate(model, b, turbo_mode="llm")
        assert out.shape == greedy[b].shape
    patch.remove()
    assert torch.equal(llava_generate(model, 2), greedy[2])


# ------------------------------------------------------- MiniGPT-v2 (LLaMA + LoRA)
MG_PATCHES = 64  # (56 / 7) ** 2


def minigpt(folder: Path) -> nn.Module:
    """``turbo_adapters.models.MiniGPTv2`` with a tiny EVA tower, built dense, then its
    LLaMA replaced by the GPTQ one: the dense LoRA (non-zero B, so LoRA matters) is
    carried over onto the quantized ``q_proj``/``v_proj``."""
    pytest.importorskip("timm")
    pytest.importorskip("peft")
    from turbo_adapters.models import MiniGPTv2, MiniGPTv2Config

    config = MiniGPTv2Config(
        image_size=56, patch_size=7, vision_width=32, vision_depth=5, vision_heads=4,
        vision_mlp_ratio=2.0, lora_r=4, lora_alpha=8, llama=llama_config(),
    )  # fmt: skip
    torch.manual_seed(0)
    model = MiniGPTv2(config)
    peaked(model, 0, "llama_model")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    lora = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    gptq.attach_gptq(model, gptq.load_gptq(folder))
    carried = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert carried.keys() == lora.keys()
    assert all(torch.equal(carried[k].float(), lora[k]) for k in lora)
    return model.eval()


def minigpt_answer(model: nn.Module, batch: int) -> torch.Tensor:
    before = [[3, 5 + b, 6][: 2 + b % 2] for b in range(batch)]
    after = [[8, 9, 10 + b][: 3 - b % 2] for b in range(batch)]
    with torch.no_grad():
        return model.generate(
            images(batch, 56), before, after, pad_token_id=PAD, max_new_tokens=NEW,
            min_new_tokens=NEW,
        )  # fmt: skip


def test_minigpt_v2_with_gptq_llama(quantized_folder: Path) -> None:
    model = minigpt(quantized_folder)
    assert_gptq(model.llama_model)
    bases = [m.get_base_layer() for m in model.llama_model.modules() if hasattr(m, "lora_A")]
    assert len(bases) == 4  # q_proj and v_proj of 2 layers: peft's LoRA around GPTQ layers
    assert all(type(b).__module__.startswith("gptqmodel.") for b in bases)
    greedy = {b: minigpt_answer(model, b) for b in (1, 3)}
    assert len(set(greedy[3].flatten().tolist())) > 2
    with model.llama_model.disable_adapter():
        assert not torch.equal(minigpt_answer(model, 3), greedy[3])  # LoRA takes part
    with ta.patched(model, r=0) as patch:
        assert patch.adapter_name == "minigpt-v2"
        for b in (1, 3):
            assert torch.equal(minigpt_answer(model, b), greedy[b])
        patch.r = 3
        for b in (1, 3):
            assert minigpt_answer(model, b).shape == (b, NEW)
            resolved = patch.last_state.resolved
            assert resolved.meets_rule and (resolved.counts[-1] - 1) % 4 == 0
            with torch.no_grad():
                tokens = model.encode_image(images(b, 56)).shape[1]
            assert tokens == (resolved.counts[-1] - 1) // 4 < MG_PATCHES // 4
    assert torch.equal(minigpt_answer(model, 3), greedy[3])
