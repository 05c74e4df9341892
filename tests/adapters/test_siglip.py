"""SigLIP vision towers (no CLS): the conformance kit with a mean-query guide oracle."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_conformance import IMAGE, PATCH, build_hf, hf_qk, images  # noqa: E402

import turbo_adapters as ta  # noqa: E402
from turbo_adapters.families import clip  # noqa: E402
from turbo_adapters.testing import Case, KitTarget, _moved, oracle, parametrize, run_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = (IMAGE // PATCH) ** 2  # no CLS


def pooled(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    return model(*args).pooler_output


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "SiglipEncoderLayer"]


def mean_guide_oracle(case: Case, alpha: float) -> None:
    """The first layer in float64: the unpatched layer's attention residual, the guide row
    of the MEAN query (heads averaged), the loop-based plan and merge, then the MLP."""
    model = case.build().to(torch.float64)
    args = _moved(case.inputs(2), KitTarget(torch.device("cpu"), torch.float64))
    first = layers(model)[0]
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:  # None: inputs unchanged
            seen.setdefault(name, inputs[0])

        return hook

    handles = [
        first.register_forward_pre_hook(keep("x")),
        first.layer_norm2.register_forward_pre_hook(keep("y")),
    ]
    with torch.no_grad():
        pooled(model, args)
    for h in handles:
        h.remove()
    q, k, scale = case.qk(model, first, first.layer_norm1(seen["x"]))
    guide = ((q.mean(2, keepdim=True) @ k.transpose(-1, -2)) * scale).softmax(-1)[:, :, 0].mean(1)
    plans = oracle.oracle_plan(k.mean(1), guide, case.r, 0, weight=alpha * 30.0)
    merged = torch.stack([oracle.oracle_merge(seen["y"][b], None, plans[b])[0] for b in range(2)])
    with torch.no_grad():
        expected = merged + first.mlp(first.layer_norm2(merged))
    depth = len(layers(model))
    patch = ta.apply(model, r=[case.r] + [0] * (depth - 1), alpha=alpha, semantic_scale=30.0)
    out: dict[str, torch.Tensor] = {}
    hook = first.register_forward_hook(lambda m, i, o: out.update(z=o) if "z" not in out else None)
    with torch.no_grad():
        pooled(model, args)
    hook.remove()
    assert patch.last_state.r_applied[0] == case.r
    torch.testing.assert_close(out["z"], expected, atol=1e-9, rtol=1e-9)


CASES = [
    Case(
        "siglip",
        build_hf("SiglipVisionModel", "SiglipVisionConfig"),
        images,
        pooled,
        TOKENS,
        0,
        layers,
        clip.CLIP_LAYER,
        hf_qk("self_attn", scale="scale"),
        oracle=mean_guide_oracle,
        cannot={
            "cpu_offload": "SigLIP's pooling head is an nn.MultiheadAttention, which reads its "
            "out_proj weight without calling out_proj: under cpu_offload it stays on the meta "
            "device and the unpatched model fails",
            "torch_pruning": "no pruning rule here for the MultiheadAttention pooling head",
        },
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
    assert out.last_hidden_state.shape[1] == TOKENS  # restored for the head and projectors
    assert patch.last_state.token_counts[-1] < TOKENS
    assert ta.get_adapter("google/siglip-base-patch16-224").name == "hf-siglip"
    assert ta.get_adapter("siglip_vision_model").name == "hf-siglip"
