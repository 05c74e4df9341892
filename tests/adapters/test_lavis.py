"""lavis-vit: the real LAVIS encoder classes (BLIP's ViT, EVA ViT-g) with random weights.

Runs in the `adapters` tox environment: ``salesforce-lavis`` imports only
with transformers < 4.27, so its package ``__init__`` files are skipped and the two
encoder modules are loaded from the installed sources on their own (real classes, real
files; the model builders, which fetch weights, are not used). Oracles: the unpatched
encoder and the conformance kit's.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import turbo_adapters as ta
from turbo_adapters.families import lavis
from turbo_adapters.testing import CHECKS, Case, run_check

IMAGE, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 48, 4, 4
TOKENS = (IMAGE // PATCH) ** 2 + 1


def _lavis_module(name: str) -> types.ModuleType:
    """``lavis.models.<name>`` from the installed sources, without LAVIS's package inits."""
    try:
        return importlib.import_module(f"lavis.models.{name}")
    except Exception:  # the package __init__ needs transformers < 4.27
        for key in [k for k in sys.modules if k == "lavis" or k.startswith("lavis.")]:
            del sys.modules[key]
    spec = importlib.util.find_spec("lavis")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("salesforce-lavis is not installed (tox -e adapters installs it)")
    root = Path(next(iter(spec.submodule_search_locations)))
    for package in ("lavis", "lavis.common", "lavis.models"):
        module = types.ModuleType(package)
        module.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
        sys.modules[package] = module
    return importlib.import_module(f"lavis.models.{name}")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def peaked(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with peaked attention (LAVIS's init is near-uniform)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embed" not in name and "token" not in name:
            gain = 3.0 if "qkv" in name else 1.0
            p.copy_(torch.randn(p.shape, generator=generator) * gain / p[0].numel() ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
        elif p.dim() == 1 and not name.endswith(("gamma_1", "gamma_2")):
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
        else:
            p.copy_(p + 0.5 * torch.randn(p.shape, generator=generator))
    return model.eval()


def build_vit() -> nn.Module:
    torch.manual_seed(0)
    vit = _lavis_module("vit")
    return peaked(
        vit.VisionTransformer(
            img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS
        )
    )


def build_eva() -> nn.Module:
    torch.manual_seed(0)
    eva = _lavis_module("eva_vit")
    return peaked(
        eva.VisionTransformer(
            img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
            qkv_bias=True, init_values=0.5, use_mean_pooling=False,
        )
    )  # fmt: skip


def images(batch: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(batch)),)


def qk(model: nn.Module, block: nn.Module, x: torch.Tensor):
    attn = block.attn
    out = attn.qkv(x)
    if getattr(attn, "q_bias", None) is not None:
        out = out + torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    batch, tokens, _ = x.shape
    qkv = out.view(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], attn.scale


def _cannot() -> dict[str, str]:
    needs = {
        "accelerate_hooks": "accelerate",
        "torchao_int8": "torchao",
        "torch_pruning": "torch_pruning",
    }
    return {
        check: f"{module} is not installed in this environment"
        for check, module in needs.items()
        if importlib.util.find_spec(module) is None
    }


def cls_token(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    return model(*args)[:, 0]


CASES = [
    Case(
        "lavis-vit", build_vit, images, cls_token, TOKENS, 1, lambda m: list(m.blocks),
        lavis.LAVIS_BLOCK, qk, cannot={**_cannot(), "torch_pruning": "not wired for LAVIS blocks"},
    ),
    Case(
        "lavis-eva-vit", build_eva, images, cls_token, TOKENS, 1, lambda m: list(m.blocks),
        lavis.EVA_BLOCK, qk,
        cannot={
            **_cannot(),
            "torch_pruning": "not wired for LAVIS blocks",
            # LAVIS's EVA Attention reads qkv.weight itself (F.linear outside qkv's forward):
            "cpu_offload": "the unpatched model reads offloaded (meta) weights: wrong output",
            "torchao_int8": "the unpatched model's F.linear rejects torchao's int8 weight",
        },
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "check"),
    [pytest.param(c, n, id=f"{c.id}-{n}") for c in CASES for n in CHECKS],
)
def test_conformance(case: Case, check: str) -> None:
    run_check(case, check)


def test_found_by_structure_and_name() -> None:
    assert lavis.lavis_kind(build_vit()) == "vit"
    assert lavis.lavis_kind(build_eva()) == "eva"
    assert ta.adapter_for_model(build_eva()).name == "lavis-vit"
    assert ta.get_adapter("eva_vit_g").name == "lavis-vit"


@torch.no_grad()
def test_visual_encoder_of_a_model_and_refusals() -> None:
    model = build_vit()
    (x,) = images(2)
    reference = model(x)
    patch = ta.apply(model, "reference-blip-caption", r=3, min_tokens=0)
    out = model(x)
    assert out.shape == (2, TOKENS - 12, WIDTH) and patch.last_state.token_counts == [14, 11, 8, 5]
    with pytest.raises(ValueError, match="register_blk"):
        model(x, register_blk=1)  # Grad-CAM maps are not materialised on Turbo's path
    ta.remove(model)
    assert torch.equal(model(x), reference)
    eva = _lavis_module("eva_vit").VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=2, num_heads=HEADS,
        use_rel_pos_bias=True,
    )  # fmt: skip
    with pytest.raises(TypeError, match="relative position bias"):
        ta.apply(eva, r=2)
