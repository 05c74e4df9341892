"""transformers adapters (ViT, DeiT, DINOv2, CLIP vision) on tiny random-init models.

Oracles: the unpatched model (r = 0, and after ``remove``), an explicit float64 forward
written here from the modules' weights with the slow loop-based merge of
``turbo_core.testing`` (shares no code with turbo_core or the adapters), and
arithmetic on the schedule for token counts.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

transformers = pytest.importorskip("transformers")

import turbo_adapters  # noqa: E402
from turbo_adapters import adapter_for_model, get_adapter, handle_of  # noqa: E402
from turbo_core import testing as oracle  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE, PATCH, WIDTH, LAYERS, HEADS = 64, 8, 64, 4, 4
GRID_TOKENS = (IMAGE // PATCH) ** 2  # 64 patches


# ----------------------------------------------------------------------------- models
def _vit_config(**kw: Any) -> Any:
    return transformers.ViTConfig(
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH,
        image_size=IMAGE,
        patch_size=PATCH,
        **kw,
    )


def _deit_config(**kw: Any) -> Any:
    return transformers.DeiTConfig(
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH,
        image_size=IMAGE,
        patch_size=PATCH,
        **kw,
    )


def _dinov2_config(**kw: Any) -> Any:
    return transformers.Dinov2Config(
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        mlp_ratio=2,
        image_size=IMAGE,
        patch_size=PATCH,
        layerscale_value=0.5,
        **kw,
    )


def _clip_vision_config(**kw: Any) -> Any:
    return transformers.CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
        projection_dim=32,
        **kw,
    )


def _clip_config(**kw: Any) -> Any:
    text = {
        "vocab_size": 99,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
        "projection_dim": 32,
    }
    vision = _clip_vision_config().to_dict()
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32, **kw)


TEXT_IDS = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 11, 12, 2]])


@dataclasses.dataclass(frozen=True)
class Case:
    """One supported class: how to build it, call it and find its vision backbone."""

    name: str
    build: Callable[..., nn.Module]  # (**config kwargs) -> model
    run: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]
    adapter: str
    prefix: int  # protected leading tokens (CLS, DeiT distillation)
    backbone: str  # class name of the module whose layers are patched

    @property
    def tokens(self) -> int:
        return GRID_TOKENS + self.prefix


def _outputs(out: Any, *names: str) -> dict[str, torch.Tensor]:
    return {n: getattr(out, n) for n in names}


def _clip_model_run(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    ids = TEXT_IDS[:1].expand(x.shape[0], -1)
    out = model(input_ids=ids, pixel_values=x)
    return _outputs(out, "logits_per_image", "image_embeds", "text_embeds")


CASES = [
    Case(
        "ViTModel",
        lambda **kw: transformers.ViTModel(_vit_config(**kw)),
        lambda m, x: _outputs(m(x), "last_hidden_state", "pooler_output"),
        "hf-vit",
        1,
        "ViTModel",
    ),
    Case(
        "ViTForImageClassification",
        lambda **kw: transformers.ViTForImageClassification(_vit_config(num_labels=5, **kw)),
        lambda m, x: _outputs(m(x), "logits"),
        "hf-vit",
        1,
        "ViTModel",
    ),
    Case(
        "DeiTModel",
        lambda **kw: transformers.DeiTModel(_deit_config(**kw)),
        lambda m, x: _outputs(m(x), "last_hidden_state", "pooler_output"),
        "hf-vit",
        2,
        "DeiTModel",
    ),
    Case(
        "DeiTForImageClassificationWithTeacher",
        lambda **kw: transformers.DeiTForImageClassificationWithTeacher(
            _deit_config(num_labels=5, **kw)
        ),
        lambda m, x: _outputs(m(x), "logits", "cls_logits", "distillation_logits"),
        "hf-vit",
        2,
        "DeiTModel",
    ),
    Case(
        "Dinov2Model",
        lambda **kw: transformers.Dinov2Model(_dinov2_config(**kw)),
        lambda m, x: _outputs(m(x), "last_hidden_state", "pooler_output"),
        "hf-dinov2",
        1,
        "Dinov2Model",
    ),
    Case(
        "Dinov2Model-swiglu",
        lambda **kw: transformers.Dinov2Model(_dinov2_config(use_swiglu_ffn=True, **kw)),
        lambda m, x: _outputs(m(x), "last_hidden_state", "pooler_output"),
        "hf-dinov2",
        1,
        "Dinov2Model",
    ),
    Case(
        "Dinov2ForImageClassification",
        lambda **kw: transformers.Dinov2ForImageClassification(_dinov2_config(num_labels=5, **kw)),
        lambda m, x: _outputs(m(x), "logits"),
        "hf-dinov2",
        1,
        "Dinov2Model",
    ),
    Case(
        "CLIPVisionModel",
        lambda **kw: transformers.CLIPVisionModel(_clip_vision_config(**kw)),
        lambda m, x: _outputs(m(x), "last_hidden_state", "pooler_output"),
        "hf-clip",
        1,
        "CLIPVisionModel",
    ),
    Case(
        "CLIPVisionModelWithProjection",
        lambda **kw: transformers.CLIPVisionModelWithProjection(_clip_vision_config(**kw)),
        lambda m, x: _outputs(m(x), "image_embeds", "last_hidden_state"),
        "hf-clip",
        1,
        "CLIPVisionModel",
    ),
    Case(
        "CLIPModel",
        lambda **kw: transformers.CLIPModel(_clip_config(**kw)),
        _clip_model_run,
        "hf-clip",
        1,
        "CLIPVisionModel",
    ),
    Case(
        "CLIPForImageClassification",
        lambda **kw: transformers.CLIPForImageClassification(_clip_config(num_labels=5, **kw)),
        lambda m, x: _outputs(m(x), "logits"),
        "hf-clip",
        1,
        "CLIPVisionModel",
    ),
]
IDS = [c.name for c in CASES]


def _make(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0, **kw: Any) -> nn.Module:
    torch.manual_seed(seed)
    model = case.build(**kw).eval().to(dtype)
    # random init leaves CLS attention nearly uniform; widen the projections a little so
    # tokens differ and the semantic term has something to rank
    with torch.no_grad():
        for module in _vision_part(case, model).modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(4.0)
    return model


def _vision_part(case: Case, model: nn.Module) -> nn.Module:
    # by class name along the MRO: after patching, the class is a Turbo subclass
    return next(
        m for m in model.modules() if any(c.__name__ == case.backbone for c in type(m).__mro__)
    )


def _images(batch: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=gen).to(dtype)


def _layers(case: Case, model: nn.Module) -> list[nn.Module]:
    names = {"ViTLayer", "DeiTLayer", "Dinov2Layer", "CLIPEncoderLayer"}
    vision = _vision_part(case, model)
    return [m for m in vision.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def _expected_counts(start: int, schedule: list[int], protected: int, min_tokens: int = 0):
    counts, n = [], start
    for r in schedule:
        removed = 0 if n < min_tokens else max(min(r, (n - protected) // 2), 0)
        n -= removed
        counts.append(n)
    return counts


def _check_partition(source: torch.Tensor, size: torch.Tensor, tokens: int, prefix: int) -> None:
    """Every output slot stands for >= 1 original token; counts equal the sizes."""
    batch = source.shape[0]
    assert source.shape == (batch, tokens)
    final = size.shape[1]
    assert int(source.min()) >= 0 and int(source.max()) == final - 1
    for b in range(batch):
        counts = torch.bincount(source[b], minlength=final).float()
        assert torch.all(counts >= 1)
        torch.testing.assert_close(counts, size[b, :, 0].float())
    # protected tokens stay in front, alone
    assert torch.equal(source[:, :prefix], torch.arange(prefix).expand(batch, prefix))
    assert torch.all(size[:, :prefix] == 1)


# ------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize(
    ("batch", "dtype"),
    [(1, torch.float32), (4, torch.float32), (4, torch.bfloat16)],
    ids=["b1-fp32", "b4-fp32", "b4-bf16"],
)
def test_r0_matches_unpatched(case: Case, batch: int, dtype: torch.dtype) -> None:
    model = _make(case, dtype)
    x = _images(batch, dtype)
    with torch.no_grad():
        expected = case.run(model, x)
        handle = turbo_adapters.apply(model, r=0)
        got = case.run(model, x)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for name in expected:
        assert got[name].dtype == dtype
        torch.testing.assert_close(got[name], expected[name], **tol, msg=name)
    assert handle.last_state.token_counts == [case.tokens] * LAYERS


FAMILY_CASES = [c for c in CASES if c.name in ("ViTModel", "DeiTModel", "Dinov2Model", "CLIPModel")]
SCHEDULE_CASES = [pytest.param(c, torch.float32, id=f"fp32-{c.name}") for c in CASES] + [
    pytest.param(c, torch.bfloat16, id=f"bf16-{c.name}") for c in FAMILY_CASES
]


@pytest.mark.parametrize(("case", "dtype"), SCHEDULE_CASES)
def test_token_counts_follow_schedule_and_sources_partition(case: Case, dtype: torch.dtype) -> None:
    model = _make(case, dtype)
    x = _images(4, dtype)
    handle = turbo_adapters.apply(model, r=8, alpha=1.0, semantic_scale=30.0, trace_source=True)
    assert handle.config.protected == case.prefix
    for schedule, min_tokens in (([8] * LAYERS, 0), ([12, 0, 5, 30], 0), ([20] * LAYERS, 40)):
        handle.configure(r=schedule, min_tokens=min_tokens)
        with torch.no_grad():
            out = case.run(model, x)
        state = handle.last_state
        expected = _expected_counts(case.tokens, schedule, case.prefix, min_tokens)
        assert state.token_counts == expected
        assert sum(state.r_applied) == case.tokens - expected[-1]
        _check_partition(state.source, state.size, case.tokens, case.prefix)
        if "last_hidden_state" in out:
            assert out["last_hidden_state"].shape[1] == expected[-1]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_alpha0_is_redundancy_only(case: Case) -> None:
    model = _make(case)
    x = _images(2)
    handle = turbo_adapters.apply(model, r=8, trace_source=True)

    def sources(**changes: Any) -> torch.Tensor:
        handle.configure(**changes)
        with torch.no_grad():
            case.run(model, x)
        return handle.last_state.source.clone()

    zero = sources(alpha=0.0, mode="turbo")
    tome = sources(alpha=1.0, mode="redundancy")
    assert torch.equal(zero, tome)
    # the comparison has power: a strong semantic term changes what merges
    assert not torch.equal(zero, sources(alpha=5.0, semantic_scale=30.0, mode="turbo"))


# ------------------------------------------------------------------- patch lifecycle
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_remove_restores_exactly(case: Case) -> None:
    model = _make(case)
    x = _images(2)
    classes = {name: type(m) for name, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        never = case.run(model, x)
        handle = turbo_adapters.apply(model, r=8)
        assert handle_of(model) is handle
        assert handle.adapter_name == case.adapter
        assert len(handle.patched_modules) >= 1 + LAYERS  # the tower and every layer
        merged = case.run(model, x)
        turbo_adapters.remove(model)
        after = case.run(model, x)
    assert any(
        merged[n].shape != never[n].shape or not torch.equal(merged[n], never[n]) for n in never
    ), "r=8 should change the outputs"
    for name in never:
        assert torch.equal(after[name], never[name]), name
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert all("_turbo_handle" not in m.__dict__ for m in model.modules())
    assert handle_of(model) is None
    state = model.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in before)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_patching_twice_raises(case: Case) -> None:
    model = _make(case)
    turbo_adapters.apply(model, r=4)
    with pytest.raises(RuntimeError, match="already patched"):
        turbo_adapters.apply(model, r=4)
    turbo_adapters.remove(model)
    turbo_adapters.apply(model, r=4)  # and again after removing


def test_patch_does_not_touch_weights_or_parameters() -> None:
    case = CASES[0]
    model = _make(case)
    params = {n: p for n, p in model.named_parameters()}
    turbo_adapters.apply(model, r=8)
    assert {n: p for n, p in model.named_parameters()} == params  # same objects


def _module_dicts(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's own attributes, to compare by identity: what "exactly" restored means."""
    return {name: dict(m.__dict__) for name, m in model.named_modules()}


def _same_dicts(now: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]]) -> bool:
    return now.keys() == before.keys() and all(
        now[n].keys() == before[n].keys() and all(now[n][k] is before[n][k] for k in before[n])
        for n in before
    )


@pytest.mark.parametrize("first", ["a", "b"])
def test_models_sharing_a_config_are_patched_and_restored_independently(first: str) -> None:
    """apply(A); apply(B); remove(A) used to route B back to sdpa (unmerged, no warning)
    and remove(B) to leave the shared config on "turbo"."""
    config = _vit_config()
    models = {}
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        models[name] = transformers.ViTModel(config).eval()
    assert models["a"].config is models["b"].config
    x, implementation = _images(2), config._attn_implementation
    dicts = {name: _module_dicts(m) for name, m in models.items()}
    with torch.no_grad():
        reference = {name: m(x).last_hidden_state for name, m in models.items()}
        patches = {name: turbo_adapters.apply(m, r=4) for name, m in models.items()}
        second = "b" if first == "a" else "a"
        turbo_adapters.remove(models[first])
        assert config._attn_implementation == implementation
        assert torch.equal(models[first](x).last_hidden_state, reference[first])
        merged = models[second](x).last_hidden_state
        counts = _expected_counts(GRID_TOKENS + 1, [4] * LAYERS, 1)
        assert patches[second].last_state.token_counts == counts
        assert merged.shape[1] == counts[-1]
        turbo_adapters.remove(models[second])
        assert torch.equal(models[second](x).last_hidden_state, reference[second])
    assert config._attn_implementation == implementation
    for name, model in models.items():
        assert _same_dicts(_module_dicts(model), dicts[name]), name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_deepcopy_of_a_patched_model_is_the_unpatched_model(case: Case) -> None:
    model, x = _make(case), _images(2)
    with torch.no_grad():
        reference = case.run(model, x)
        turbo_adapters.apply(model, r=8)
        merged = case.run(model, x)
    with pytest.warns(turbo_adapters.UnpatchedCopyWarning, match="not patched"):
        twin = copy.deepcopy(model)
    with torch.no_grad():
        copied, still = case.run(twin, x), case.run(model, x)
    for name in reference:
        assert torch.equal(copied[name], reference[name]), name
        assert torch.equal(still[name], merged[name]), name
    turbo_adapters.remove(model)
    for original, copy_ in zip(model.modules(), twin.modules(), strict=True):
        assert handle_of(copy_) is None
        assert set(copy_.__dict__) == set(original.__dict__)  # nothing of the patch came along

    def configs(m: nn.Module) -> set[int]:
        return {id(part.config) for part in m.modules() if "config" in part.__dict__}

    # the copy's modules share their configs as the original's do, not the patch's copies
    assert len(configs(twin)) == len(configs(model))


@functools.cache
def _twins_sharing_a_config() -> tuple[Any, dict[str, nn.Module]]:
    """Two tiny ViTs (different weights) on one config object, built once for the fuzz."""
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    models = {}
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        models[name] = transformers.ViTModel(config).eval()
    return config, models


_OPS = st.one_of(
    st.tuples(st.just("apply"), st.sampled_from("ab"), st.sampled_from([0, 3, 40])),
    st.tuples(st.just("r"), st.sampled_from("ab"), st.sampled_from([0, 2, 5, 40])),
    st.tuples(st.just("alpha"), st.sampled_from("ab"), st.sampled_from([0.0, 1.0, 30.0])),
    st.tuples(st.just("forward"), st.sampled_from("ab"), st.none()),
    st.tuples(st.just("remove"), st.sampled_from("ab"), st.none()),
)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.lists(_OPS, min_size=1, max_size=10))
def test_fuzz_patches_on_models_sharing_a_config(ops: list[tuple[str, str, Any]]) -> None:
    """apply / settings / forward / remove in any order on two models sharing a config:
    every forward merges exactly as its own patch says (or not at all when unpatched), and
    after the last remove both models are exactly as before."""
    config, models = _twins_sharing_a_config()
    x, implementation = torch.randn(1, 3, 32, 32), config._attn_implementation
    dicts = {name: _module_dicts(m) for name, m in models.items()}
    with torch.no_grad():
        reference = {name: m(x).last_hidden_state for name, m in models.items()}
    r_of: dict[str, int] = {}  # the patched models and their r
    try:
        for op, name, value in ops:
            model = models[name]
            if op == "apply" and name in r_of:
                with pytest.raises(RuntimeError, match="already patched"):
                    turbo_adapters.apply(model, r=value)
            elif op == "apply":
                turbo_adapters.apply(model, r=value)
                r_of[name] = value
            elif op == "remove" and name not in r_of:
                with pytest.raises(ValueError, match="not patched"):
                    turbo_adapters.remove(model)
            elif op == "remove":
                turbo_adapters.remove(model)
                del r_of[name]
            elif op in ("r", "alpha") and name in r_of:
                setattr(handle_of(model), op, value)
                r_of[name] = value if op == "r" else r_of[name]
            elif op == "forward":
                with torch.no_grad():
                    out = model(x).last_hidden_state
                if name in r_of:
                    counts = _expected_counts(16 + 1, [r_of[name]] * 2, 1)  # CLS + 4 x 4
                    assert handle_of(model).last_state.token_counts == counts
                    assert out.shape[1] == counts[-1]
                else:
                    assert torch.equal(out, reference[name])
            assert config._attn_implementation == implementation  # never the shared config
    finally:
        for name in list(r_of):
            turbo_adapters.remove(models[name])
    with torch.no_grad():
        for name, model in models.items():
            assert torch.equal(model(x).last_hidden_state, reference[name])
            assert _same_dicts(_module_dicts(model), dicts[name]), name


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_gives_finite_gradients(case: Case) -> None:
    model = _make(case).train()
    turbo_adapters.apply(model, r=8, alpha=1.0, semantic_scale=30.0)
    outputs = case.run(model, _images(2))
    loss = sum(o.float().pow(2).mean() for o in outputs.values())
    loss.backward()
    for layer in _layers(case, model):
        attention = next(m for m in layer.modules() if hasattr(m, "q_proj"))
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
            assert proj.weight.grad is not None
            assert torch.isfinite(proj.weight.grad).all()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_is_refused_while_merging() -> None:
    model = _make(CASES[0]).train()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    turbo_adapters.apply(model, r=8)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(_images(1))


def test_attention_mask_is_refused_while_merging() -> None:
    model = _make(CASES[0])
    turbo_adapters.apply(model, r=8)
    mask = torch.ones(1, GRID_TOKENS + 1, dtype=torch.long)
    mask[:, -5:] = 0  # a real padding mask (an all-ones mask is dropped by transformers)
    with pytest.raises(ValueError, match="attention_mask"):
        model(_images(1), attention_mask=mask)


# ------------------------------------------------------------------ output_attentions
ATTENTION_CASES = [
    c for c in CASES if c.name in ("ViTModel", "DeiTModel", "Dinov2Model", "CLIPVisionModel")
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c.name for c in ATTENTION_CASES])
def test_output_attentions(case: Case) -> None:
    # eager attention so the unpatched model returns its probabilities too
    model = _make(case, attn_implementation="eager")
    x = _images(2)
    with torch.no_grad():
        reference = model(x, output_attentions=True, output_hidden_states=True)
        handle = turbo_adapters.apply(model, r=0)
        same = model(x, output_attentions=True)
        assert len(same.attentions) == LAYERS
        for got, want in zip(same.attentions, reference.attentions, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        handle.r = 8
        merged = model(x, output_attentions=True, output_hidden_states=True)
    counts = [case.tokens, *handle.last_state.token_counts[:-1]]  # tokens entering each layer
    assert [a.shape for a in merged.attentions] == [(2, HEADS, n, n) for n in counts]
    for probs in merged.attentions:
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert [h.shape[1] for h in merged.hidden_states] == [
        case.tokens,
        *handle.last_state.token_counts,
    ]


# ------------------------------------------------------------------------ pruned heads
def _prune_heads(attention: nn.Module, keep: list[int]) -> None:
    """Replace q/k/v/out by smaller Linear layers holding only the ``keep`` heads."""
    d = attention.head_dim
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
    out_name = "o_proj" if hasattr(attention, "o_proj") else "out_proj"
    for name in ("q_proj", "k_proj", "v_proj"):
        old = getattr(attention, name)
        new = nn.Linear(old.in_features, len(rows), bias=old.bias is not None)
        with torch.no_grad():
            new.weight.copy_(old.weight[rows])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows])
        setattr(attention, name, new)
    old = getattr(attention, out_name)
    new = nn.Linear(len(rows), old.out_features, bias=old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(old.weight[:, rows])
        if old.bias is not None:
            new.bias.copy_(old.bias)
    setattr(attention, out_name, new)


PRUNE_CASES = [c for c in CASES if c.name in ("ViTModel", "Dinov2Model", "CLIPVisionModel")]


@pytest.mark.parametrize("case", PRUNE_CASES, ids=[c.name for c in PRUNE_CASES])
def test_pruned_heads_still_run(case: Case) -> None:
    model = _make(case)
    pruned = next(m for m in _layers(case, model)[1].modules() if hasattr(m, "q_proj"))
    _prune_heads(pruned, keep=[0, 2])
    x = _images(2)
    with torch.no_grad():
        expected = case.run(model, x)
        handle = turbo_adapters.apply(model, r=0)
        got = case.run(model, x)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)
        handle.r = 8
        case.run(model, x)
    assert handle.last_state.token_counts == _expected_counts(case.tokens, [8] * LAYERS, 1)


# ------------------------------------------------ merged forward vs explicit oracle
def _oracle_forward(case: Case, model: nn.Module, x: torch.Tensor, r: int, weight: float):
    """Float64 explicit forward: attention with log-size bias, merge via the loop oracle."""
    vision = _vision_part(case, model)
    if case.backbone == "CLIPVisionModel":
        h = vision.pre_layrnorm(vision.embeddings(x))
    else:
        h = vision.embeddings(x)
    batch, tokens, _ = h.shape
    size = torch.ones(batch, tokens, 1, dtype=h.dtype)
    for block, layer in enumerate(_layers(case, model)):
        if case.backbone == "CLIPVisionModel":
            norm1, attn, norm2 = layer.layer_norm1, layer.self_attn, layer.layer_norm2
            out = attn.out_proj
            scale1 = scale2 = nn.Identity()
        elif case.backbone == "Dinov2Model":
            norm1, attn, norm2 = layer.norm1, layer.attention, layer.norm2
            out, scale1, scale2 = attn.o_proj, layer.layer_scale1, layer.layer_scale2
        else:
            norm1, attn, norm2 = layer.layernorm_before, layer.attention, layer.layernorm_after
            out = attn.o_proj
            scale1 = scale2 = nn.Identity()
        y = norm1(h)
        n = y.shape[1]
        q, k, v = (
            p(y).reshape(batch, n, HEADS, -1).transpose(1, 2)
            for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + size.log().reshape(batch, 1, 1, n)
        probs = logits.softmax(-1)
        h = h + scale1(out((probs @ v).transpose(1, 2).reshape(batch, n, -1)))
        metric, semantic = k.mean(1), probs[:, :, 0, :].mean(1)
        plans = oracle.oracle_plan(
            metric, semantic, r, case.prefix, "turbo", "difference", weight, block=block
        )
        merged = [oracle.oracle_merge(h[b], size[b], plans[b]) for b in range(batch)]
        h = torch.stack([m[0] for m in merged]).to(h.dtype)
        size = torch.stack([m[1] for m in merged]).to(h.dtype)
        h = h + scale2(layer.mlp(norm2(h)))
    if case.backbone != "CLIPVisionModel":
        h = vision.layernorm(h)
    return h, size


ORACLE_CASES = [
    c for c in CASES if c.name in ("ViTModel", "DeiTModel", "Dinov2Model", "CLIPVisionModel")
]


@pytest.mark.parametrize("case", ORACLE_CASES, ids=[c.name for c in ORACLE_CASES])
@pytest.mark.parametrize("weight", [0.0, 30.0])
def test_merged_forward_matches_explicit_oracle(case: Case, weight: float) -> None:
    model = _make(case, torch.float64)
    x = _images(2, torch.float64)
    with torch.no_grad():
        want, want_size = _oracle_forward(case, model, x, r=8, weight=weight)
        handle = turbo_adapters.apply(model, r=8, alpha=weight, semantic_scale=1.0)
        got = model(x).last_hidden_state
    assert got.shape == want.shape == (2, case.tokens - 8 * LAYERS, WIDTH)
    # not 1e-12: turbo_core keeps sizes in float32, so log(size) is rounded to ~1e-7
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(handle.last_state.size.double(), want_size)


# ------------------------------------------------------------------- pooling heads
@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.name in ("Dinov2ForImageClassification", "CLIPForImageClassification")],
    ids=["Dinov2ForImageClassification", "CLIPForImageClassification"],
)
def test_classifier_mean_is_size_weighted(case: Case) -> None:
    model = _make(case)
    x = _images(2)
    handle = turbo_adapters.apply(model, r=12)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        size = handle.last_state.size  # (B, N, 1)
        last = out.hidden_states[-1]  # last layer output, before any final norm
        if case.backbone == "Dinov2Model":
            last = model.dinov2.layernorm(last)
        patches, weights = last[:, 1:], size[:, 1:]
        mean = (patches * weights).sum(1) / weights.sum(1)
        features = torch.cat([last[:, 0], mean], 1) if case.backbone == "Dinov2Model" else mean
        torch.testing.assert_close(out.logits, model.classifier(features), atol=1e-5, rtol=1e-5)
        # and that the weighting matters here
        plain = patches.mean(1)
        assert not torch.allclose(mean, plain, atol=1e-4)
    assert out.to_tuple()[0] is out.logits
    assert isinstance(model(x, return_dict=False), tuple)


# --------------------------------------------------------------------------- CLIPModel
def test_clip_model_patches_vision_tower_only() -> None:
    case = next(c for c in CASES if c.name == "CLIPModel")
    model = _make(case)
    x = _images(2)
    text_classes = [type(m) for m in model.text_model.modules()]
    with torch.no_grad():
        before = case.run(model, x)
        handle = turbo_adapters.apply(model, r=8)
        after = case.run(model, x)
        features = model.get_image_features(pixel_values=x).pooler_output
    assert [type(m) for m in model.text_model.modules()] == text_classes
    assert all(
        handle_of(m) is None and "_turbo_handle" not in m.__dict__
        for m in model.text_model.modules()
    )
    assert torch.equal(after["text_embeds"], before["text_embeds"])
    assert not torch.allclose(after["image_embeds"], before["image_embeds"], atol=1e-4)
    torch.testing.assert_close(
        features / features.norm(dim=-1, keepdim=True), after["image_embeds"]
    )
    assert handle.last_state.token_counts == _expected_counts(case.tokens, [8] * LAYERS, 1)


# --------------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    ("name", "adapter"),
    [
        ("google/vit-base-patch16-224", "hf-vit"),
        ("google/vit-large-patch32-384", "hf-vit"),
        ("facebook/deit-base-patch16-224", "hf-vit"),
        ("facebook/deit-small-distilled-patch16-224", "hf-vit"),
        ("vit", "hf-vit"),
        ("deit", "hf-vit"),
        ("facebook/dinov2-small", "hf-dinov2"),
        ("facebook/dinov2-giant-imagenet1k-1-layer", "hf-dinov2"),
        ("dinov2", "hf-dinov2"),
        ("openai/clip-vit-base-patch32", "hf-clip"),
        ("openai/clip-vit-large-patch14-336", "hf-clip"),
        ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "hf-clip"),
        ("clip", "hf-clip"),
        ("clip_vision_model", "hf-clip"),
        ("hf-vit", "hf-vit"),
        ("hf-dinov2", "hf-dinov2"),
        ("hf-clip", "hf-clip"),
    ],
)
def test_registry_names(name: str, adapter: str) -> None:
    assert get_adapter(name).name == adapter


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_registry_finds_adapter_by_class(case: Case) -> None:
    model = _make(case)
    assert adapter_for_model(model).name == case.adapter
    assert model.config.model_type in get_adapter(case.adapter).model_types
    handle = turbo_adapters.apply(model, adapter=model.config.model_type, r=4)
    assert handle.adapter_name == case.adapter


def test_unsupported_classes_are_refused() -> None:
    backbone = transformers.Dinov2Backbone(_dinov2_config())
    with pytest.raises(TypeError, match="cannot patch"):
        turbo_adapters.apply(backbone, adapter="hf-dinov2")
    text = transformers.CLIPTextModel(_clip_config().text_config)
    with pytest.raises(TypeError):
        turbo_adapters.apply(text, adapter="hf-clip")
