"""hf-blip: BLIP captioning, retrieval (ITM + ITC) and VQA on tiny random-init models.

Oracles: the unpatched model (``BlipAttention``'s own eager forward at r = 0, greedy
and beam-search ids, ITM/ITC scores, after ``remove``), per-row calls for batches, a
float64 ``BlipAttention`` for the attention path, and the conformance kit's oracles.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from support.tiny_blip import (  # noqa: E402
    HEADS,
    TOKENS,
    WIDTH,
    build,
    build_vision,
    images,
    prune_mlp,
    text,
)

import turbo_adapters as ta  # noqa: E402
from turbo_adapters.families import blip  # noqa: E402
from turbo_adapters.testing import Case, parametrize, run_check  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------ the kit
def blip_qk(model: nn.Module, block: nn.Module, x: torch.Tensor):
    attn = block.self_attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).view(batch, tokens, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], attn.scale


def vision_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "BlipEncoderLayer"]


def caption_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return images(batch), text(batch)


def caption_logits(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    return model(pixel_values=args[0], input_ids=args[1]).logits


def itm_and_itc(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    """ITM logits and the ITC image feature (from the CLS) of one call."""
    pixels, ids = args
    out = model(input_ids=ids, pixel_values=pixels)
    image_feat = nn.functional.normalize(model.vision_proj(out.last_hidden_state[:, 0]), dim=-1)
    return torch.cat([out.itm_score, image_feat], dim=-1)


def vqa_state(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    pixels, ids = args
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    question = model.text_encoder(input_ids=ids, encoder_hidden_states=image).last_hidden_state
    return question


CASES = [
    Case(
        "hf-blip-vision",
        lambda: build_vision(),
        lambda b: (images(b),),
        lambda m, a: m(*a).last_hidden_state[:, 0],
        TOKENS,
        1,
        vision_layers,
        blip.BLIP_LAYER,
        blip_qk,
        prune=prune_mlp,
    ),
    Case(
        "hf-blip-caption",
        lambda: build("BlipForConditionalGeneration"),
        caption_inputs,
        caption_logits,
        TOKENS,
        1,
        vision_layers,
        blip.BLIP_LAYER,
        blip_qk,
        prune=prune_mlp,
    ),
    Case(
        "hf-blip-retrieval",
        lambda: build("BlipForImageTextRetrieval"),
        caption_inputs,
        itm_and_itc,
        TOKENS,
        1,
        vision_layers,
        blip.BLIP_LAYER,
        blip_qk,
        prune=prune_mlp,
    ),
    Case(
        "hf-blip-vqa",
        lambda: build("BlipForQuestionAnswering"),
        caption_inputs,
        vqa_state,
        TOKENS,
        1,
        vision_layers,
        blip.BLIP_LAYER,
        blip_qk,
        prune=prune_mlp,
        cannot={
            "compile": "BlipForQuestionAnswering.forward returns no per-row state to compare, "
            "so vqa_state calls vision_model and text_encoder directly: a compiled model "
            "wrapper would never run (the tower compiles in hf-blip-caption)"
        },
    ),
]


@parametrize(CASES)
def test_conformance(case: Case, check: str) -> None:
    run_check(case, check)


# ------------------------------------------------------------- the attention path
def test_layout_attention_equals_blip_attention_float64() -> None:
    from turbo_adapters.attention import layout_attention
    from turbo_adapters.site import ReductionSite
    from turbo_core import TurboConfig

    attention = build_vision().double().encoder.layers[0].self_attn
    x = torch.randn(
        3, TOKENS, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    site = ReductionSite("vision", TurboConfig(r=0, protected=1), 1)
    with torch.no_grad(), site.scope() as call:
        expected, probs = attention(x)
        got = layout_attention(attention, blip.BLIP_ATTENTION, x, site, call)
    assert probs.shape == (3, HEADS, TOKENS, TOKENS)  # the library materialises them
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_attention_weights_are_none_not_a_wrong_slice() -> None:
    model = build_vision()
    ta.apply(model, r=2)
    out = model(images(2), output_attentions=True, output_hidden_states=True)
    assert all(a is None for a in out.attentions)
    assert [h.shape[1] for h in out.hidden_states][-1] == out.last_hidden_state.shape[1]


# ------------------------------------------------------------------- every class
@torch.no_grad()
def test_r0_equals_unpatched_ids_and_scores() -> None:
    caption = build("BlipForConditionalGeneration")
    pixels = images(3)
    greedy = caption.generate(pixel_values=pixels, max_new_tokens=6)
    beams = caption.generate(pixel_values=pixels, max_new_tokens=6, num_beams=3)
    ta.apply(caption, r=0)
    assert torch.equal(caption.generate(pixel_values=pixels, max_new_tokens=6), greedy)
    assert torch.equal(caption.generate(pixel_values=pixels, max_new_tokens=6, num_beams=3), beams)

    vqa = build("BlipForQuestionAnswering")
    question = text(3)
    answers = vqa.generate(input_ids=question, pixel_values=pixels, max_new_tokens=4)
    ta.apply(vqa, r=0)
    assert torch.equal(
        vqa.generate(input_ids=question, pixel_values=pixels, max_new_tokens=4), answers
    )

    retrieval = build("BlipForImageTextRetrieval")
    itm = retrieval(input_ids=question, pixel_values=pixels).itm_score
    itc = retrieval(input_ids=question, pixel_values=pixels, use_itm_head=False).itm_score
    ta.apply(retrieval, r=0)
    torch.testing.assert_close(retrieval(input_ids=question, pixel_values=pixels).itm_score, itm)
    torch.testing.assert_close(
        retrieval(input_ids=question, pixel_values=pixels, use_itm_head=False).itm_score, itc
    )


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _cross_key_lengths(model: nn.Module) -> list[int]:
    lengths: list[int] = []
    first = next(m for n, m in model.named_modules() if n.endswith("layer.0.crossattention.self"))

    def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        image = kwargs.get("encoder_hidden_states")
        if image is not None:
            lengths.append(image.shape[1])

    first.register_forward_pre_hook(hook, with_kwargs=True)
    return lengths


@pytest.mark.parametrize("batch", [1, 4])
@torch.no_grad()
def test_caption_generate_reduces_once_per_call(batch: int) -> None:
    model = build("BlipForConditionalGeneration")
    patch = ta.apply(model, "reference-blip-caption", r=3, min_tokens=0)
    tower_calls = _count_calls(model.vision_model)
    lengths = _cross_key_lengths(model.text_decoder)
    pixels = images(batch)
    greedy = model.generate(pixel_values=pixels, max_new_tokens=6, min_new_tokens=6)
    assert tower_calls == [1]
    assert patch.last_state.token_counts == [14, 11, 8, 5]
    assert greedy.shape == (batch, 7)
    # every decoding step cross-attends to the same 5 reduced image tokens
    assert len(lengths) == 6 and set(lengths) == {5}
    beams = model.generate(pixel_values=pixels, max_new_tokens=6, min_new_tokens=6, num_beams=3)
    assert tower_calls == [2] and beams.shape == (batch, 7)
    if batch > 1:  # each row as if alone
        for b in range(batch):
            alone = model.generate(
                pixel_values=pixels[b : b + 1], max_new_tokens=6, min_new_tokens=6
            )
            assert torch.equal(alone[0], greedy[b])


@torch.no_grad()
def test_vqa_and_retrieval_with_reduction() -> None:
    pixels, question = images(4), text(4)
    vqa = build("BlipForQuestionAnswering")
    patch = ta.apply(vqa, "reference-blip-vqa", r=3, min_tokens=0)
    answers = vqa.generate(input_ids=question, pixel_values=pixels, max_new_tokens=4, num_beams=2)
    assert answers.shape[0] == 4 and patch.last_state.token_counts == [14, 11, 8, 5]

    retrieval = build("BlipForImageTextRetrieval")
    ta.apply(retrieval, "reference-blip-retrieval", r=3, min_tokens=0)
    out = retrieval(input_ids=question, pixel_values=pixels)
    assert out.itm_score.shape == (4, 2) and out.last_hidden_state.shape[1] == 5
    itc = retrieval(input_ids=question, pixel_values=pixels, use_itm_head=False).itm_score
    assert itc.shape == (4, 4) and torch.isfinite(itc).all()
    # ITC reads the CLS: protected, first, never merged; its value changes only through attention
    sizes = ta.token_sizes(out.last_hidden_state)
    assert sizes is not None and torch.all(sizes[:, 0] == 1)


def test_min_tokens_stops_merging() -> None:
    model = build_vision()
    patch = ta.apply(model, r=3, min_tokens=12)
    model(images(1))
    assert patch.last_state.token_counts == [14, 11, 11, 11]


# ----------------------------------------------------------------- names, loading
@pytest.mark.parametrize(
    "name",
    [
        "Salesforce/blip-image-captioning-base",
        "Salesforce/blip-image-captioning-large",
        "Salesforce/blip-itm-base-coco",
        "Salesforce/blip-vqa-base",
        "blip",
        "blip_vision_model",
    ],
)
def test_registry_names(name: str) -> None:
    assert ta.get_adapter(name).name == "hf-blip"


def test_model_objects_find_the_adapter() -> None:
    for cls in (
        "BlipForConditionalGeneration",
        "BlipForImageTextRetrieval",
        "BlipForQuestionAnswering",
    ):
        assert ta.adapter_for_model(build(cls)).name == "hf-blip"


@torch.no_grad()
def test_from_pretrained_on_a_local_checkpoint(tmp_path) -> None:
    build("BlipForConditionalGeneration").save_pretrained(tmp_path)
    model = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixels = images(2)
    reference = model.generate(pixel_values=pixels, max_new_tokens=5)
    patch = ta.apply(model, "reference-blip-caption", r=0)
    assert torch.equal(model.generate(pixel_values=pixels, max_new_tokens=5), reference)
    patch.r = 3
    patch.configure(min_tokens=0)
    assert model.generate(pixel_values=pixels, max_new_tokens=5).shape == reference.shape
    assert patch.last_state.token_counts[-1] == 5


# ------------------------------------------------------------ cross-modal guidance
@torch.no_grad()
def test_cross_modal_r0_equals_unpatched_and_reduces_once_per_call() -> None:
    model = build("BlipForImageTextRetrieval")
    pixels, question = images(3), text(3)
    reference = model(input_ids=question, pixel_values=pixels).itm_score
    patch = ta.apply(model, r=0)
    site = blip.use_cross_modal_guidance(patch, r=0)
    torch.testing.assert_close(model(input_ids=question, pixel_values=pixels).itm_score, reference)
    assert site.last_state.token_counts == [TOKENS]
    lengths = _cross_key_lengths(model.text_encoder)
    second = next(
        m
        for n, m in model.text_encoder.named_modules()
        if n.endswith("layer.1.crossattention.self")
    )
    seen: list[int] = []
    second.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    patch.configure(site="vision", r=2)
    patch.configure(site=blip.CROSS_SITE, r=3)
    scores = model(input_ids=question, pixel_values=pixels).itm_score
    assert scores.shape == (3, 2) and torch.isfinite(scores).all()
    assert patch.sites["vision"].last_state.token_counts == [15, 13, 11, 9]
    assert site.last_state.token_counts == [6]
    assert lengths[-1] == 6 and seen[-1] == 6  # every cross-attention sees the reduced image
    assert float(site.last_state.size.sum(dim=1)[0]) == TOKENS  # sizes carried from the tower


@pytest.mark.parametrize("reduce", ["merge", "prune"])
@torch.no_grad()
def test_cross_modal_decisions_follow_the_text(reduce: str) -> None:
    model = build("BlipForQuestionAnswering")
    pixels = images(2)
    patch = ta.apply(model, r=0)
    site = blip.use_cross_modal_guidance(
        patch, r=5, reduce=reduce, trace_source=True, mode="semantics"
    )
    sources = []
    for seed in (1, 2):
        question = text(2, seed=seed)
        answers = model.generate(input_ids=question, pixel_values=pixels, max_new_tokens=3)
        assert answers.shape[0] == 2
        sources.append(site.last_state.source)
    assert site.last_state.token_counts == [TOKENS - 5]
    assert not torch.equal(sources[0], sources[1])  # another question, other tokens kept
    if reduce == "prune":  # survivors keep their sizes: nothing was averaged in
        assert torch.all(site.last_state.size == 1)


@torch.no_grad()
def test_cross_modal_alpha0_equals_redundancy_and_remove_restores() -> None:
    model = build("BlipForImageTextRetrieval")
    pixels, question = images(2), text(2)
    reference = model(input_ids=question, pixel_values=pixels).itm_score
    patch = ta.apply(model, r=0)
    site = blip.use_cross_modal_guidance(patch, r=4, trace_source=True, alpha=0.0)
    alpha0 = model(input_ids=question, pixel_values=pixels).itm_score
    source = site.last_state.source
    patch.configure(site=blip.CROSS_SITE, mode="redundancy", alpha=3.0)
    torch.testing.assert_close(model(input_ids=question, pixel_values=pixels).itm_score, alpha0)
    assert torch.equal(site.last_state.source, source)
    ta.remove(model)
    assert torch.equal(model(input_ids=question, pixel_values=pixels).itm_score, reference)


def test_cross_modal_needs_a_text_encoder() -> None:
    patch = ta.apply(build("BlipForConditionalGeneration"), r=2)
    with pytest.raises(TypeError, match="cross-attends"):
        blip.use_cross_modal_guidance(patch, r=2)
    with pytest.raises(ValueError, match="reduce must be one of"):
        blip.use_cross_modal_guidance(patch, r=2, reduce="drop")


# ------------------------------------------------- proportional attention downstream
def _duplicated(image: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Every merged token repeated as many times as it has members: attending to these
    copies is exactly proportional attention over the merged tokens (an oracle that
    shares nothing with the bias)."""
    return image.gather(1, source.unsqueeze(-1).expand(-1, -1, image.shape[-1]))


@torch.no_grad()
def test_size_bias_downstream_equals_attending_to_copies() -> None:
    model = build("BlipForConditionalGeneration")
    pixels, ids = images(2), text(2)
    patch = ta.apply(model, r=3, trace_source=True)
    plain = model(pixel_values=pixels, input_ids=ids).logits
    blip.use_size_bias_downstream(patch)
    biased = model(pixel_values=pixels, input_ids=ids).logits
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    copies = _duplicated(image, patch.last_state.source)
    assert copies.shape[1] == TOKENS
    oracle = model.text_decoder(input_ids=ids, encoder_hidden_states=copies).logits
    torch.testing.assert_close(biased, oracle, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(biased, plain, atol=1e-4)
    for beams in (1, 3):  # every step and every beam sees the bias
        out = model.generate(pixel_values=pixels, max_new_tokens=5, num_beams=beams)
        assert out.shape[0] == 2


@torch.no_grad()
def test_size_bias_downstream_r0_and_remove() -> None:
    model = build("BlipForQuestionAnswering")
    pixels, question = images(2), text(2)
    reference = model.generate(input_ids=question, pixel_values=pixels, max_new_tokens=4)
    patch = ta.apply(model, r=0)
    blip.use_size_bias_downstream(patch)
    blip.use_cross_modal_guidance(patch, r=0)
    assert torch.equal(
        model.generate(input_ids=question, pixel_values=pixels, max_new_tokens=4), reference
    )
    patch.r = 3
    assert model.generate(input_ids=question, pixel_values=pixels, max_new_tokens=4).shape[0] == 2
    ta.remove(model)
    assert torch.equal(
        model.generate(input_ids=question, pixel_values=pixels, max_new_tokens=4), reference
    )


@torch.no_grad()
def test_size_bias_reaches_a_text_encoder_called_on_the_tower_output() -> None:
    """A retrieval loop encodes each image once and calls the text encoder on the tower's
    output itself (outside the model's forward): the bias must reach it all the same."""
    model = build("BlipForImageTextRetrieval")
    pixels, ids = images(2), text(2)
    patch = ta.apply(model, r=3)
    plain = model(input_ids=ids, pixel_values=pixels).itm_score
    blip.use_size_bias_downstream(patch)
    forward = model(input_ids=ids, pixel_values=pixels).itm_score
    assert not torch.allclose(forward, plain, atol=1e-4)
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    assert ta.token_sizes(image) is not None
    out = model.text_encoder(input_ids=ids, encoder_hidden_states=image).last_hidden_state
    torch.testing.assert_close(model.itm_head(out[:, 0]), forward)
