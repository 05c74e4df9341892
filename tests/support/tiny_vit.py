"""Tiny vision towers' shared pieces for the adapter conformance tests: sizes, weights under
which attention is peaked (:func:`informative`), images, and q/k readers for the kit's
float64 oracle."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IMAGE, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 48, 4, 4


TOKENS = (IMAGE // PATCH) ** 2 + 1  # 16 patches + CLS


@torch.no_grad()
def informative(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights large enough that attention is peaked and tokens differ (library inits
    give near-uniform attention, which would hide errors in q, k or the size bias)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embed" not in name and "token" not in name:
            gain = (
                3.0
                if any(s in name for s in ("qkv", "q_proj", "k_proj", "query", "key", "in_proj"))
                else 1.0
            )
            p.copy_(torch.randn(p.shape, generator=generator) * gain / p[0].numel() ** 0.5)
        elif "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
        elif p.dim() == 1 and not name.endswith(("gamma_1", "gamma_2", "lambda1")):
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
        else:  # embeddings, tokens, layer scale
            p.copy_(p + 0.5 * torch.randn(p.shape, generator=generator))
    return model.eval()


def images(batch: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(batch)),)


def heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    batch, tokens, _ = t.shape
    return t.view(batch, tokens, -1, head_dim).transpose(1, 2)


def of_class(name: str) -> Any:
    return lambda model: [m for m in model.modules() if type(m).__name__ == name]


def timm_qk(model: nn.Module, block: nn.Module, x: torch.Tensor):
    attn = block.attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, -1, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), attn.scale


def vision_config(cls: Any, **kw: Any) -> Any:
    return cls(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH, image_size=IMAGE, patch_size=PATCH, **kw,
    )  # fmt: skip


def hf_qk(attention: str, q: str = "q_proj", k: str = "k_proj", scale: str = "scaling"):
    def qk(model: nn.Module, block: nn.Module, x: torch.Tensor):
        attn = block.get_submodule(attention)
        dim = getattr(attn, "head_dim", getattr(attn, "attention_head_size", None))
        return (
            heads(getattr(attn, q)(x), dim),
            heads(getattr(attn, k)(x), dim),
            getattr(attn, scale),
        )

    return qk
