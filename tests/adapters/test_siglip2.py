"""SigLIP2 vision towers (no CLS, NaFlex padding): the conformance kit, and padded batches
against each image run alone at its own length."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from support.tiny_vit import DEPTH, HEADS, PATCH, WIDTH, hf_qk, informative  # noqa: E402

import turbo_adapters as ta  # noqa: E402
from turbo_adapters.families import clip  # noqa: E402
from turbo_adapters.padded_site import padded_rows  # noqa: E402
from turbo_adapters.testing import (  # noqa: E402
    Case,
    KitTarget,
    _moved,
    expected_counts,
    oracle,
    parametrize,
    run_check,
)
from turbo_core import Ratio, Target, resolve_schedule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = (4, 4)  # the kit's images: 16 patches each, unpadded
TOKENS = GRID[0] * GRID[1]
PIXELS = 3 * PATCH * PATCH
#: a NaFlex batch: patch grids of different sizes, padded to the longest
SHAPES = ((4, 6), (3, 4), (2, 5), (4, 5))


def vision_config(**kw: Any) -> Any:
    return transformers.Siglip2VisionConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH, patch_size=PATCH, num_patches=TOKENS, **kw,
    )  # fmt: skip


def build_vision() -> nn.Module:
    torch.manual_seed(0)
    return informative(transformers.Siglip2VisionModel(vision_config()))


def siglip2_config(**kw: Any) -> Any:
    text = transformers.Siglip2TextConfig(
        vocab_size=50, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.Siglip2Config(
        text_config=text.to_dict(), vision_config=vision_config().to_dict(), **kw
    )


def build_classifier() -> nn.Module:
    torch.manual_seed(0)
    return informative(transformers.Siglip2ForImageClassification(siglip2_config(num_labels=5)))


def build_dual() -> nn.Module:
    torch.manual_seed(0)
    return informative(transformers.Siglip2Model(siglip2_config()))


def naflex(shapes: tuple[tuple[int, int], ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Patchified pixels, the padding mask and the grids of images of these patch grids."""
    generator = torch.Generator().manual_seed(seed)
    length = max(h * w for h, w in shapes)
    pixels = torch.zeros(len(shapes), length, PIXELS)
    mask = torch.zeros(len(shapes), length, dtype=torch.long)
    for i, (h, w) in enumerate(shapes):
        pixels[i, : h * w] = torch.randn(h * w, PIXELS, generator=generator)
        mask[i, : h * w] = 1
    return pixels, mask, torch.tensor(shapes)


def alone(args: tuple[torch.Tensor, ...], i: int) -> tuple[torch.Tensor, ...]:
    """Image ``i`` of a padded batch on its own, at its own length (no padding)."""
    pixels, mask, shapes = args
    n = int(mask[i].sum())
    return pixels[i : i + 1, :n], mask[i : i + 1, :n], shapes[i : i + 1]


def images(batch: int) -> tuple[torch.Tensor, ...]:
    return naflex((GRID,) * batch, seed=batch)


def pooled(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    return model(*args).pooler_output


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Siglip2EncoderLayer"]


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
        "siglip2",
        build_vision,
        images,
        pooled,
        TOKENS,
        0,
        layers,
        clip.CLIP_LAYER,
        hf_qk("self_attn", scale="scale"),
        oracle=mean_guide_oracle,
        cannot={
            "cpu_offload": "SigLIP2's pooling head is an nn.MultiheadAttention, which reads its "
            "out_proj weight without calling out_proj: under cpu_offload it stays on the meta "
            "device and the unpatched model fails",
            "torch_pruning": "no pruning rule here for the MultiheadAttention pooling head",
        },
    )
]


@parametrize(CASES)
def test_conformance(case: Case, check: str) -> None:
    run_check(case, check)


# ------------------------------------------------------------- padded batches
def run(model: nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
    with torch.no_grad():
        return model(*args)


def real_rows(args: tuple[torch.Tensor, ...]) -> list[int]:
    return [int(n) for n in args[1].sum(1)]


@pytest.mark.parametrize("r", [3, Ratio(0.25), Target(5)], ids=["r3", "ratio", "target"])
def test_padded_batch_equals_each_image_alone(r: Any) -> None:
    """The oracle: every image of a padded batch, reduced in the batch, equals the image
    run alone at its own length (no padding there to get wrong), in the pooled output and
    in every real token of ``last_hidden_state``; each row follows its own schedule."""
    model = build_vision()
    args = naflex(SHAPES)
    unpatched = run(model, args)
    patch = ta.apply(model, r=r)
    batched = run(model, args)
    state = patch.last_state
    rows = padded_rows(state)
    assert rows is not None
    lengths = real_rows(args)
    for i, n in enumerate(lengths):
        single = run(model, alone(args, i))
        own = expected_counts(n, 0, list(resolve_schedule(r, n, DEPTH, protected=0).r))
        assert patch.last_state.token_counts == own  # alone: the batched path
        assert rows.counts[i] == own  # in the batch: the row's own schedule
        torch.testing.assert_close(batched.pooler_output[i], single.pooler_output[0])
        torch.testing.assert_close(batched.last_hidden_state[i, :n], single.last_hidden_state[0])
    # the batch's width is its longest row's count; the rows did not all reduce alike
    assert state.token_counts == [max(c) for c in zip(*rows.counts, strict=True)]
    assert len({tuple(c) for c in rows.counts}) > 1
    assert not torch.allclose(batched.pooler_output, unpatched.pooler_output, atol=1e-3)


def test_padding_is_handed_back_as_it_entered() -> None:
    """Padding positions come back holding the encoder's input (after post_layernorm),
    at full length; padding has no slot among the merged tokens, real tokens all have one."""
    model = build_vision()
    args = naflex(SHAPES)
    entry: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        entry.setdefault("x", kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0])

    model.encoder.register_forward_pre_hook(keep, with_kwargs=True)
    patch = ta.apply(model, r=3, trace_source=True)
    out = run(model, args)
    assert out.last_hidden_state.shape[:2] == args[1].shape
    pad = ~args[1].bool()
    assert bool(pad.any())
    with torch.no_grad():
        padding = model.post_layernorm(entry["x"][pad])
    torch.testing.assert_close(out.last_hidden_state[pad], padding)
    source = patch.last_state.source
    assert bool((source[pad] == -1).all()) and bool((source[~pad] >= 0).all())
    assert int(source[~pad].max()) < patch.last_state.token_counts[-1]


def test_r0_with_padding_equals_unpatched() -> None:
    model = build_vision()
    args = naflex(SHAPES)
    ref = run(model, args)
    patch = ta.apply(model, r=0)
    got = run(model, args)
    assert patch.last_state.token_counts == [args[1].shape[1]] * DEPTH  # nothing merged
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, atol=2e-5, rtol=2e-5)
    ta.remove(model)
    assert torch.equal(run(model, args).pooler_output, ref.pooler_output)


def test_classifier_masked_mean_equals_each_image_alone() -> None:
    """``Siglip2ForImageClassification`` averages the restored tokens under its mask:
    padded rows equal their images alone."""
    model = build_classifier()
    args = naflex(SHAPES)
    ref = run(model, args).logits
    ta.apply(model, r=2)
    batched = run(model, args).logits
    assert not torch.allclose(batched, ref, atol=1e-4)
    for i in range(len(SHAPES)):
        torch.testing.assert_close(batched[i], run(model, alone(args, i)).logits[0])


def image_features(model: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    pixels, mask, shapes = args
    with torch.no_grad():
        out = model.get_image_features(
            pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes
        )
    return getattr(out, "pooler_output", out)


def test_dual_encoder_patches_the_vision_tower_only() -> None:
    """``Siglip2Model``: its text tower (same layer class) is untouched and gives the same
    features; image features of a padded batch equal each image alone."""
    model = build_dual()
    args = naflex(SHAPES)
    ids = torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        text_ref = model.get_text_features(input_ids=ids)
    every_layer = layers(model)  # the text tower's too: the same class
    vision_layers = layers(model.vision_model)
    assert len(every_layer) > len(vision_layers)
    ta.apply(model, r=2)
    patched = {id(m) for m in every_layer if "forward" in m.__dict__}
    assert patched == {id(m) for m in vision_layers}
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids)
    assert torch.equal(
        getattr(text, "pooler_output", text), getattr(text_ref, "pooler_output", text_ref)
    )
    batched = image_features(model, args)
    for i in range(len(SHAPES)):
        torch.testing.assert_close(batched[i], image_features(model, alone(args, i))[0])


def test_names_resolve() -> None:
    assert ta.get_adapter("google/siglip2-base-patch16-naflex").name == "hf-siglip2"
    assert ta.get_adapter("google/siglip2-so400m-patch14-384").name == "hf-siglip2"
    assert ta.get_adapter("siglip2_vision_model").name == "hf-siglip2"
    assert ta.get_adapter("google/siglip-base-patch16-224").name == "hf-siglip"
    assert ta.adapter_for_model(build_vision()).name == "hf-siglip2"


def test_padded_batch_under_accelerate_hooks() -> None:
    """accelerate's device-alignment hooks (cpu_offload cannot run the unpatched pooling
    head, see CASES), added before and after apply, on a padded batch: the patched model
    gives its outputs and per-row counts without hooks, the hooks still run around every
    layer, and remove() leaves every hook (and accelerate's forward) as it was, with the
    unpatched outputs."""
    from accelerate.hooks import attach_align_device_hook
    from support.accelerate_hooks import count_calls, hooks_of

    cpu = torch.device("cpu")
    args = naflex(SHAPES)
    model = build_vision()
    ref = run(model, args)
    patch = ta.apply(model, r=3)
    want = run(model, args)
    want_rows = padded_rows(patch.last_state).counts
    assert len({tuple(c) for c in want_rows}) > 1  # rows reduced each by its own schedule
    ta.remove(model)

    # hooks before apply
    model = build_vision()
    attach_align_device_hook(model, execution_device=cpu)
    counting = count_calls(layers(model))
    hooks = hooks_of(model)
    assert set(hooks) >= {f"encoder.layers.{i}" for i in range(DEPTH)}
    patch = ta.apply(model, r=3)
    before = counting.calls
    got = run(model, args)
    assert counting.calls - before == DEPTH
    assert padded_rows(patch.last_state).counts == want_rows
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-6, rtol=1e-6)
    for i, n in enumerate(real_rows(args)):
        torch.testing.assert_close(got.last_hidden_state[i, :n], want.last_hidden_state[i, :n])
    ta.remove(model)
    assert hooks_of(model) == hooks
    before = counting.calls
    assert torch.equal(run(model, args).pooler_output, ref.pooler_output)
    assert counting.calls - before == DEPTH

    # hooks after apply
    model = build_vision()
    patch = ta.apply(model, r=3)
    attach_align_device_hook(model, execution_device=cpu)
    counting = count_calls(layers(model))
    hooks = hooks_of(model)
    got = run(model, args)
    assert padded_rows(patch.last_state).counts == want_rows
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-6, rtol=1e-6)
    ta.remove(model)
    assert hooks_of(model) == hooks
    before = counting.calls
    assert torch.equal(run(model, args).pooler_output, ref.pooler_output)
    assert counting.calls - before == DEPTH


def test_padded_batch_remove_restores_exactly() -> None:
    """After a merged padded batch, remove() gives back the unpatched outputs bit for bit,
    the same weights and no attribute of Turbo's on any module."""
    model = build_vision()
    args = naflex(SHAPES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = run(model, args)
    dicts = [set(m.__dict__) for m in model.modules()]
    patch = ta.apply(model, r=3)
    merged = run(model, args)
    assert padded_rows(patch.last_state) is not None
    assert not torch.allclose(merged.pooler_output, ref.pooler_output, atol=1e-4)
    ta.remove(model)
    got = run(model, args)
    assert torch.equal(got.pooler_output, ref.pooler_output)
    assert torch.equal(got.last_hidden_state, ref.last_hidden_state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [set(m.__dict__) for m in model.modules()] == dicts
    assert ta.handle_of(model) is None
