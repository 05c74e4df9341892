"""InternViT (transformers ``InternVLVisionModel``): tower merging with its CLS token on the
conformance kit (the kit's float64 block oracle included), output restored to full length."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_conformance import IMAGE, PATCH, build_hf, hf_qk, images, of_class  # noqa: E402

import turbo_adapters as ta  # noqa: E402
from turbo_adapters.families import internvl_vision  # noqa: E402
from turbo_adapters.testing import Case, parametrize, run_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = (IMAGE // PATCH) ** 2 + 1  # patches + CLS


def hidden(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    return model(*args).last_hidden_state


def _build() -> nn.Module:
    model = build_hf("InternVLVisionModel", "InternVLVisionConfig")()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # layer scales of order 1, per channel (init is 0.1 everywhere)
        for module in model.modules():
            if hasattr(module, "lambda_1"):
                module.lambda_1.copy_(0.5 + torch.rand(module.lambda_1.shape, generator=generator))
                module.lambda_2.copy_(0.5 + torch.rand(module.lambda_2.shape, generator=generator))
    return model.eval()


CASES = [
    Case(
        "hf-internvl-vision",
        _build,
        images,
        hidden,
        TOKENS,
        1,
        of_class("InternVLVisionLayer"),
        internvl_vision.INTERNVL_VISION_LAYER,
        hf_qk("attention", scale="scale"),
        cannot={"torch_pruning": "no torch-pruning rule written here for InternViT's attention"},
    )
]


@parametrize(CASES)
def test_conformance(case: Case, check: str) -> None:
    run_check(case, check)


def test_output_keeps_its_length_and_names_resolve() -> None:
    model = CASES[0].build()
    patch = ta.apply(model, r=3)
    with torch.no_grad():
        out = model(*images(2))
    assert out.last_hidden_state.shape[1] == TOKENS  # restored for InternVL's pixel shuffle
    assert patch.last_state.token_counts[-1] < TOKENS
    assert ta.get_adapter("OpenGVLab/InternViT-300M-448px").name == "hf-internvl-vision"
    assert ta.get_adapter("internvl_vision").name == "hf-internvl-vision"
