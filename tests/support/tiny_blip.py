"""A tiny BLIP (transformers) for the adapter tests: config, peaked random weights, images,
text ids and a torch-pruning step on the vision MLPs."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

IMAGE, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 48, 4, 4


TOKENS = (IMAGE // PATCH) ** 2 + 1  # 16 patches + CLS


VOCAB, BOS, SEP, PAD = 60, 1, 2, 0


def blip_config() -> Any:
    vision = dict(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH, image_size=IMAGE, patch_size=PATCH,
    )  # fmt: skip
    text = dict(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH, encoder_hidden_size=WIDTH, max_position_embeddings=40,
        bos_token_id=BOS, sep_token_id=SEP, eos_token_id=SEP, pad_token_id=PAD,
    )  # fmt: skip
    return transformers.BlipConfig(vision_config=vision, text_config=text)


@torch.no_grad()
def peaked(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with peaked attention and distinct tokens (the library's init
    gives near-uniform attention, which would hide errors in q, k or the size bias)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embed" not in name:
            gain = 3.0 if name.endswith(("qkv.weight", "query.weight", "key.weight")) else 1.0
            p.copy_(torch.randn(p.shape, generator=generator) * gain / p.shape[-1] ** 0.5)
        elif "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
        elif p.dim() == 1:
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
        else:  # patch, position and class embeddings
            p.copy_(p + 0.5 * torch.randn(p.shape, generator=generator))
    return model.eval()


def build(cls: str) -> nn.Module:
    torch.manual_seed(0)
    return peaked(getattr(transformers, cls)(blip_config()))


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(batch))


def text(batch: int, length: int = 7, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = BOS
    return ids


def prune_mlp(model: nn.Module, args: tuple[Any, ...]) -> None:
    """torch-pruning on the vision MLPs (30% of channels). BlipAttention reshapes with
    ``embed_dim // num_heads`` from its input, so the unpatched model cannot run with a
    pruned head; Turbo reads heads from the tensors either way."""
    import torch_pruning as tp

    tower = model.vision_model if hasattr(model, "vision_model") else model
    keep = [m for m in tower.modules() if isinstance(m, nn.Linear) and "mlp" not in _name(tower, m)]
    pruner = tp.pruner.MetaPruner(
        tower, args[0], importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.3,
        ignored_layers=[*keep, tower.embeddings],
    )  # fmt: skip
    pruner.step()
    assert tower.encoder.layers[0].mlp.fc1.out_features < 2 * WIDTH


def _name(root: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is module)


def build_vision() -> nn.Module:
    torch.manual_seed(0)
    return peaked(transformers.BlipVisionModel(blip_config().vision_config))
