"""Vision-language adapters through the conformance kit (turbo_adapters.testing).

The kit's checks run on each model's tower mode (the reduction the kit can count);
LLM mode has its own oracles in test_llava.py and test_minigpt.py, and its conformance
checks in test_conformance_llm.py. Model helpers
(weights, images, q/k) are the ones test_conformance.py gives every family.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

from support.tiny_vit import (  # noqa: E402
    DEPTH,
    HEADS,
    TOKENS,
    WIDTH,
    heads,
    hf_qk,
    images,
    informative,
    of_class,
    vision_config,
)
from timm.models.eva import EvaAttention  # noqa: E402

from turbo_adapters.families import clip, timm_eva  # noqa: E402
from turbo_adapters.models import MiniGPTv2, MiniGPTv2Config  # noqa: E402
from turbo_adapters.testing import Case, parametrize, run_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- LLaVA
LLAVA_IMAGE_TOKEN = 39


def build_llava() -> nn.Module:
    """LLaVA-1.5's layout: CLIP tower read at vision_feature_layer -2 (3 of its 4
    layers merge), CLS dropped, a tiny LLaMA with grouped-query attention."""
    torch.manual_seed(0)
    text = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=40, pad_token_id=0,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision_config(transformers.CLIPVisionConfig), text_config=text,
        image_token_id=LLAVA_IMAGE_TOKEN, image_seq_length=TOKENS - 1,
        projector_hidden_act="gelu",
    )  # fmt: skip
    model = informative(transformers.LlavaForConditionalGeneration(config))
    # transformers installs its output-capturing hooks on the tower's first forward:
    # one call here, so the kit's before/after comparisons see the model as used
    with torch.no_grad():
        llava_next_token_logits(model, llava_inputs(1))
    return model


def llava_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image per row: ``input_ids`` with its placeholders, and ``pixel_values``."""
    text = torch.randint(1, 30, (batch, 4), generator=torch.Generator().manual_seed(batch))
    image = torch.full((batch, TOKENS - 1), LLAVA_IMAGE_TOKEN)
    ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    return ids, images(batch)[0]


def llava_next_token_logits(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    """Tower mode shortens the sequence; the last position is the next token's."""
    ids, pixels = args
    return model(input_ids=ids, pixel_values=pixels).logits[:, -1]


CASES = [
    Case(
        "llava",
        build_llava,
        llava_inputs,
        llava_next_token_logits,
        TOKENS,
        1,
        lambda m: of_class("CLIPEncoderLayer")(m)[:-1],  # the layers up to the feature layer
        clip.CLIP_LAYER,
        hf_qk("self_attn", scale="scale"),
        cannot={
            "torch_pruning": "torch-pruning traces from the logits, which the last CLIP layer "
            "(after vision_feature_layer -2) does not reach: it keeps its full width while "
            "the residual stream is pruned, so the unpatched pruned model fails there",
        },
    ),
]


# -------------------------------------------------------------------- MiniGPT-v2
MINIGPT_IMAGE = 48  # 36 patches: the kit's r (4) and its thread r's (1, 5) keep a
MINIGPT_TOKENS = (MINIGPT_IMAGE // 8) ** 2 + 1  # multiple of 4 at the concatenation


def build_minigpt() -> nn.Module:
    """MiniGPT-v2's layout: EVA tower (fused qkv, q/v biases, no RoPE), LayerNorm, CLS
    dropped, 4-token concatenation, projection into a tiny LLaMA with LoRA."""
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=40, pad_token_id=0,
    )  # fmt: skip
    config = MiniGPTv2Config(
        image_size=MINIGPT_IMAGE, patch_size=8, vision_width=WIDTH, vision_depth=DEPTH,
        vision_heads=HEADS, vision_mlp_ratio=2.0, lora_r=4, lora_alpha=8, llama=llama,
    )  # fmt: skip
    return informative(MiniGPTv2(config))


def minigpt_pixels(batch: int) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 3, MINIGPT_IMAGE, MINIGPT_IMAGE, generator=g),)


def minigpt_image_embeds(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    """What enters the language model: ``(B, patches / 4, hidden)``."""
    return model.encode_image(*args)


def minigpt_qk(model: nn.Module, block: nn.Module, x: torch.Tensor):
    attn = block.attn
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    q, k, _ = (heads(t, attn.head_dim) for t in (attn.qkv(x) + bias).chunk(3, dim=-1))
    return attn.q_norm(q), attn.k_norm(k), attn.scale


CASES.append(
    Case(
        "minigpt-v2",
        build_minigpt,
        minigpt_pixels,
        minigpt_image_embeds,
        MINIGPT_TOKENS,
        1,
        lambda m: list(m.visual_encoder.blocks),
        timm_eva.eva_block(EvaAttention(WIDTH, num_heads=HEADS, norm_layer=nn.LayerNorm)),
        minigpt_qk,
        r=4,
        cannot={
            "counts_follow_schedule": "by design the multiple-of-4 rule lowers the last "
            "blocks' r of the check's schedules [r + 2, 0, 1] and (r, -1.0); "
            "test_minigpt.py checks the adjusted schedules against a count loop for every r",
            "cpu_offload": "accelerate's hooks load a module's own parameters in its "
            "forward, and MiniGPT-v2 calls Eva.forward_features: Eva's cls_token and "
            "pos_embed stay on the meta device and the unpatched model fails",
            "torchao_int8": "timm's fused-qkv EvaAttention calls F.linear(x, weight, bias=...) "
            "itself, which torchao 0.18's int8 weight rejects",
            "torch_pruning": "torch-pruning does not prune EvaAttention's separate q_bias/"
            "v_bias parameters with the qkv rows, so the unpatched pruned model cannot run",
        },
    )
)


@parametrize(CASES)
def test_conformance(case: Case, check: str) -> None:
    run_check(case, check)
