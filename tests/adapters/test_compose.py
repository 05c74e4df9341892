"""Turbo stacked on pruning and weight-only int8 (turbo_adapters.compose).

Oracles: the pruned/quantized model unpatched (r = 0), the schedule arithmetic of the
conformance kit, an eager attention written here with the dense scale (narrowed
heads), and the kit itself run on narrowed and pruned models (its float64 block
oracle reads q/k and the scale from the modules, so it checks the narrowed width).
For BLIP, whose attention cannot run changed heads, the library's own forward on a
hand-pruned attention is the oracle for the recipes' refusal.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")

from support.tiny_blip import DEPTH as BLIP_DEPTH  # noqa: E402
from support.tiny_blip import build as build_blip  # noqa: E402
from support.tiny_blip import build_vision as build_blip_vision  # noqa: E402
from support.tiny_blip import text as blip_text  # noqa: E402
from support.tiny_vit import hf_qk, images, informative, timm_qk  # noqa: E402

import turbo_adapters as ta  # noqa: E402
from turbo_adapters import compose  # noqa: E402
from turbo_adapters.families import hf_vit, timm_vit  # noqa: E402
from turbo_adapters.testing import Case, expected_counts, run_check  # noqa: E402

IMAGE, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 80, 3, 10  # head width 8
TOKENS = (IMAGE // PATCH) ** 2 + 1
R = 3
NARROW = [1.0, 0.5, 0.25]  # per-layer head width kept: 8, 4, 2 channels per head

pytestmark = pytest.mark.usefixtures("one_thread")


def timm_dense() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
        num_classes=10, qkv_bias=True,
    )  # fmt: skip
    return informative(model)


def hf_dense(
    model_cls: str = "ViTForImageClassification", config_cls: str = "ViTConfig"
) -> nn.Module:
    torch.manual_seed(0)
    kw = {"num_labels": 10} if "Classification" in model_cls else {}
    config = getattr(transformers, config_cls)(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH, image_size=IMAGE, patch_size=PATCH, **kw,
    )  # fmt: skip
    return informative(getattr(transformers, model_cls)(config))


def logits(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    out = model(*args)
    return (
        getattr(out, "logits", None)
        if hasattr(out, "logits")
        else getattr(out, "pooler_output", out)
    )


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return logits(model, (x,))


def check_patched(model: nn.Module, x: torch.Tensor, *, atol: float = 2e-5) -> ta.TurboPatch:
    """r = 0 equals the model as it is; r = R merges on the schedule; finite outputs."""
    ref = run(model, x)
    patch = ta.apply(model, r=0)
    torch.testing.assert_close(run(model, x), ref, atol=atol, rtol=atol)
    patch.r = R
    out = run(model, x)
    assert torch.isfinite(out).all()
    assert patch.last_state.token_counts == expected_counts(TOKENS, 1, [R] * DEPTH)
    return patch


def narrowed(build: Any) -> Any:
    def make() -> nn.Module:
        model = build()
        compose.narrow_heads(model, NARROW, mlp_keep=[0.7, 0.5, 0.6])
        return model

    return make


def pruned(build: Any) -> Any:
    def make() -> nn.Module:
        model = build()
        compose.prune_heads_and_mlp(model, images(2)[0], head_ratio=0.3, mlp_ratio=0.3)
        return model

    return make


# ------------------------------------------------- torch-pruning: heads and MLP
@pytest.mark.parametrize("build", [timm_dense, hf_dense], ids=["timm", "hf-vit"])
def test_torch_pruning_30_percent_then_patch(build: Any) -> None:
    model = build()
    x = images(2)[0]
    hidden = {fc1.out_features for fc1, _ in compose.mlp_pairs(model).values()}.pop()
    kept = compose.prune_heads_and_mlp(model, x, head_ratio=0.3, mlp_ratio=0.3)
    assert set(kept.values()) == {7}  # 10 heads -> 7, head width 8 kept
    for attention in compose.attention_modules(model).values():
        assert compose.projection_width(attention) == 7 * 8 and attention.head_dim == 8
    for fc1, fc2 in compose.mlp_pairs(model).values():
        assert fc1.out_features == fc2.in_features == round(0.7 * hidden)
        assert fc1.in_features == WIDTH  # the residual width is untouched
    check_patched(model, x)


def test_clip_pruned_then_patched() -> None:
    model = hf_dense("CLIPVisionModel", "CLIPVisionConfig")
    x = images(2)[0]
    compose.prune_heads_and_mlp(model, x)
    check_patched(model, x)


# ------------------------------------------------------ UPop-style narrowed heads
def eager_attention(attention: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Written here: fused qkv or q/k/v, heads from the module, explicit softmax."""
    b, n, _ = x.shape
    if hasattr(attention, "qkv"):
        q, k, v = attention.qkv(x).chunk(3, dim=-1)
        out_proj = attention.proj
    else:
        q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        out_proj = attention.o_proj
    q, k, v = (t.view(b, n, -1, attention.head_dim).transpose(1, 2) for t in (q, k, v))
    weights = ((q @ k.transpose(-1, -2)) * scale).softmax(-1)
    return out_proj((weights @ v).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize(
    ("build", "scale_attr"), [(timm_dense, "scale"), (hf_dense, "scaling")], ids=["timm", "hf-vit"]
)
def test_narrowed_heads_keep_heads_and_dense_scale(build: Any, scale_attr: str) -> None:
    model = build()
    dense = {n: compose.head_shape(a) for n, a in compose.attention_modules(model).items()}
    widths = compose.narrow_heads(model, NARROW)
    assert list(widths.values()) == [8, 4, 2]
    x = torch.randn(2, TOKENS, WIDTH, generator=torch.Generator().manual_seed(3))
    for name, attention in compose.attention_modules(model).items():
        shape = compose.head_shape(attention)
        assert shape.num_heads == HEADS and shape.head_dim == widths[name]
        assert getattr(attention, scale_attr) == dense[name].scale == 8**-0.5  # never rescaled
        with torch.no_grad():
            out = attention(x)
            out = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(out, eager_attention(attention, x, 8**-0.5))
    check_patched(model, images(2)[0])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("build", [timm_dense, hf_dense], ids=["timm", "hf-vit"])
def test_load_narrowed_checkpoint_into_dense_config(tmp_path: Any, build: Any, suffix: str) -> None:
    source = narrowed(build)()
    x = images(2)[0]
    ref = run(source, x)
    path = compose.save_pruned(source, tmp_path / f"upop{suffix}")
    model = build()  # the dense config: every Linear of the wrong shape
    changed = compose.load_pruned(model, path, keep="heads")
    assert [shape for shape in changed.values()] == [(HEADS, 4), (HEADS, 2)]  # layer 0 kept all
    torch.testing.assert_close(run(model, x), ref, atol=0, rtol=0)
    patch = compose.load_pruned_then_patch(build(), path, r=0)
    torch.testing.assert_close(run(patch.model, x), ref, atol=2e-5, rtol=2e-5)


def test_load_head_pruned_checkpoint(tmp_path: Any) -> None:
    source = pruned(timm_dense)()
    x = images(2)[0]
    path = compose.save_pruned(source, tmp_path / "tp.safetensors")
    model = timm_dense()
    changed = compose.load_pruned(model, path, keep="head_dim")
    assert set(changed.values()) == {(7, 8)}
    assert all(b.attn.num_heads == 7 and b.attn.attn_dim == 56 for b in model.blocks)
    torch.testing.assert_close(run(model, x), run(source, x), atol=0, rtol=0)
    check_patched(model, x)


def test_checkpoint_wrapped_in_model_key(tmp_path: Any) -> None:
    source = narrowed(timm_dense)()
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    state = compose.read_state_dict(tmp_path / "ckpt.pth")
    assert set(state) == set(source.state_dict())


# ------------------------------------------------------------------ weight-only int8
def _quantized_linear_classes(model: nn.Module) -> set[str]:
    return {
        f"{type(m).__name__}/{type(m.weight).__name__}"
        for m in model.modules()
        if hasattr(m, "weight") and "Linear" in type(m).__name__
    }


@pytest.mark.parametrize(("backend", "weights", "kind"), [
    ("torchao", "int8", "Linear/Int8Tensor"),
    ("quanto", "int8", "QLinear/WeightQBytesTensor"),
    ("quanto", "int4", "QLinear/WeightQBitsTensor"),
])  # fmt: skip
@pytest.mark.parametrize("build", [timm_dense, hf_dense], ids=["timm", "hf-vit"])
def test_int8_linear_layers_inside_patched_vit(
    build: Any, backend: str, weights: str, kind: str
) -> None:
    pytest.importorskip("torchao" if backend == "torchao" else "optimum.quanto")
    model = build()
    head = "head" if hasattr(model, "head") else "classifier"
    compose.quantize_weights(model, backend, weights, skip=[head])
    classes = _quantized_linear_classes(model)
    assert kind in classes and "Linear/Parameter" in classes  # the head stays float
    check_patched(model, images(2)[0], atol=1e-4)


def test_narrowed_then_int8_then_patch() -> None:
    pytest.importorskip("torchao")
    model = narrowed(timm_dense)()
    x = images(2)[0]
    compose.quantize_weights(model, "torchao")
    check_patched(model, x, atol=1e-4)


def test_recipes_return_working_patches() -> None:
    pytest.importorskip("torchao")
    x = images(2)[0]
    for make in (
        lambda: compose.quantize_then_patch(timm_dense(), "torchao", skip=["head"], r=R),
        lambda: compose.prune_then_patch(timm_dense(), x, quantize="torchao", r=R),
        lambda: compose.narrow_then_patch(timm_dense(), NARROW, quantize="torchao", r=R),
    ):
        patch = make()
        run(patch.model, x)
        assert patch.last_state.token_counts == expected_counts(TOKENS, 1, [R] * DEPTH)
        patch.remove()


# ------------------------------------------------------------ the kit on pruned models
KIT_CHECKS = (
    "r0_equals_unpatched",
    "counts_follow_schedule",
    "batch_equals_single",
    "block_matches_float64_oracle",
    "torchao_int8",
)
KIT_CASES = [
    Case("narrowed-timm", narrowed(timm_dense), images, lambda m, a: m(*a), TOKENS, 1,
         lambda m: list(m.blocks), timm_vit.TIMM_BLOCK, timm_qk),
    Case("narrowed-hf-vit", narrowed(hf_dense), images, lambda m, a: m(*a).logits, TOKENS, 1,
         lambda m: [x for x in m.modules() if type(x).__name__ == "ViTLayer"],
         hf_vit.HF_VIT_LAYER, hf_qk("attention")),
    Case("pruned-hf-vit", pruned(hf_dense), images, lambda m, a: m(*a).logits, TOKENS, 1,
         lambda m: [x for x in m.modules() if type(x).__name__ == "ViTLayer"],
         hf_vit.HF_VIT_LAYER, hf_qk("attention")),
]  # fmt: skip


@pytest.mark.parametrize("check", KIT_CHECKS)
@pytest.mark.parametrize("case", KIT_CASES, ids=[c.id for c in KIT_CASES])
def test_kit_on_pruned_models(case: Case, check: str) -> None:
    run_check(case, check)


# ------------------------------------------------------------------------ errors
def test_errors_name_the_parameter_and_range() -> None:
    with pytest.raises(ValueError, match=r"keep entries must be fractions in \(0, 1\], got 1.5"):
        compose.narrow_heads(timm_dense(), 1.5)
    with pytest.raises(ValueError, match="keep has 2 entries for 3 layers"):
        compose.narrow_heads(timm_dense(), [0.5, 0.5])
    with pytest.raises(ValueError, match=r"head_ratio must be a number in \[0, 1\), got 1.0"):
        compose.prune_heads_and_mlp(timm_dense(), images(2)[0], head_ratio=1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        compose.quantize_weights(timm_dense(), "bitsandbytes")
    with pytest.raises(ValueError, match="weights must be one of"):
        compose.quantize_weights(timm_dense(), "torchao", "int4")
    with pytest.raises(ValueError, match="keep must be 'heads' or 'head_dim'"):
        compose.load_pruned(timm_dense(), {}, keep="width")
    quantized = compose.quantize_weights(timm_dense(), "torchao")
    with pytest.raises(TypeError, match="prune before quantizing"):
        compose.narrow_heads(quantized, 0.5)
    state = timm_dense().state_dict()
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"][:40]
    with pytest.raises(TypeError, match="only Linear and LayerNorm layers are resized"):
        compose.load_pruned(timm_dense(), state)
    source = narrowed(timm_dense)()
    odd = copy.deepcopy(source.state_dict())
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        compose.load_pruned(timm_dense(), odd, keep="head_dim")  # 10 x 4 is not k x 8


# ------------------------------------------- BLIP: the MLPs shrink, the heads cannot
def blip_captions(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            pixel_values=pixels, input_ids=blip_text(pixels.shape[0], 2), max_new_tokens=5,
            do_sample=False,
        )  # fmt: skip


def check_blip_patched(model: nn.Module, pixels: torch.Tensor) -> None:
    """r = 0 equals the pruned model unpatched (tower output and greedy captions); at
    r = R the counts follow the schedule and captions are generated from fewer tokens."""
    tower = model.vision_model
    with torch.no_grad():
        ref_image = tower(pixel_values=pixels).last_hidden_state
    ref_ids = blip_captions(model, pixels)
    patch = ta.apply(model, r=0)
    with torch.no_grad():
        image = tower(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(image, ref_image, atol=2e-5, rtol=2e-5)
    assert torch.equal(blip_captions(model, pixels), ref_ids)
    patch.r = R
    with torch.no_grad():
        merged = tower(pixel_values=pixels).last_hidden_state
    counts = expected_counts(TOKENS, 1, [R] * BLIP_DEPTH)
    assert patch.last_state.token_counts == counts and merged.shape[1] == counts[-1]
    ids = blip_captions(model, pixels)
    assert ids.shape[0] == pixels.shape[0] and ids.shape[1] > 2
    patch.remove()
    with torch.no_grad():
        torch.testing.assert_close(tower(pixel_values=pixels).last_hidden_state, ref_image)


def test_blip_mlp_channels_pruned_by_torch_pruning_then_patched() -> None:
    model = build_blip("BlipForConditionalGeneration")
    pixels = images(2)[0]
    kept = compose.prune_heads_and_mlp(model.vision_model, pixels, head_ratio=0.0, mlp_ratio=0.3)
    assert set(kept.values()) == {4}  # heads untouched
    widths = {fc1.out_features for fc1, _ in compose.mlp_pairs(model.vision_model).values()}
    assert widths == {round(0.7 * 96)}
    check_blip_patched(model, pixels)


def test_blip_mlp_narrowed_upop_style_then_patched() -> None:
    model = build_blip("BlipForConditionalGeneration")
    widths = compose.narrow_heads(model.vision_model, 1.0, mlp_keep=[0.5, 0.75, 0.25, 1.0])
    assert set(widths.values()) == {12}  # every head keeps its 12 channels
    fc1 = [fc1.out_features for fc1, _ in compose.mlp_pairs(model.vision_model).values()]
    assert fc1 == [48, 72, 24, 96]
    check_blip_patched(model, images(2)[0])


def _hand_pruned(attention: nn.Module, rows: torch.Tensor, heads: int, head_dim: int) -> None:
    """Keep ``rows`` of q, k and v (and those columns of the output), set every attribute."""
    embed = attention.embed_dim
    fused = torch.cat([rows + i * embed for i in range(3)])
    with torch.no_grad():
        qkv = nn.Linear(embed, 3 * len(rows))
        qkv.weight.copy_(attention.qkv.weight[fused])
        qkv.bias.copy_(attention.qkv.bias[fused])
        out = nn.Linear(len(rows), embed)
        out.weight.copy_(attention.projection.weight[:, rows])
        out.bias.copy_(attention.projection.bias)
    attention.qkv, attention.projection = qkv, out
    attention.num_heads, attention.head_dim, attention.embed_dim = heads, head_dim, len(rows)


@pytest.mark.parametrize(
    ("rows", "heads", "head_dim"),
    [(torch.arange(36), 3, 12), (torch.arange(48).view(4, 12)[:, :6].flatten(), 4, 6)],
    ids=["whole-heads", "narrowed"],
)
def test_blip_attention_cannot_run_changed_heads_unpatched(
    rows: torch.Tensor, heads: int, head_dim: int
) -> None:
    """The library fact behind the refusal: with num_heads, head_dim and embed_dim all
    set to the pruned shape, BlipAttention still splits q/k/v with its input width."""
    attention = build_blip_vision().encoder.layers[0].self_attn
    _hand_pruned(attention, rows, heads, head_dim)
    with pytest.raises(RuntimeError, match="is invalid for input of size"):
        attention(torch.randn(1, TOKENS, 48))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cls", ["BlipVisionModel", "Blip2VisionModel"])
def test_blip_heads_are_refused_before_anything_changes(cls: str) -> None:
    if cls == "BlipVisionModel":
        model = build_blip_vision()
    else:
        torch.manual_seed(0)
        config = transformers.Blip2VisionConfig(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            image_size=IMAGE, patch_size=PATCH, qkv_bias=True,
        )  # fmt: skip
        model = transformers.Blip2VisionModel(config).eval()
    name = cls.replace("VisionModel", "Attention")
    before = _snapshot(model)
    why = rf"\({name}\) cannot run {{}} heads x {{}} channels unpatched .*splits q/k/v"
    with pytest.raises(TypeError, match=why.format(2, 12)):
        compose.prune_heads_and_mlp(model, images(2)[0], head_ratio=0.3)
    with pytest.raises(TypeError, match=why.format(4, 6)):
        compose.narrow_heads(model, 0.5, mlp_keep=0.5)
    narrowed_state = dict(before)
    for key in [k for k in before if k.endswith("self_attn.qkv.weight")]:
        narrowed_state[key] = before[key][::2]
    with pytest.raises(TypeError, match=why.format(4, 6)):
        compose.load_pruned(model, narrowed_state, keep="heads")
    after = _snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # nothing was pruned
