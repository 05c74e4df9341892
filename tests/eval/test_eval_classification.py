"""The image-folder classification task on a tiny transformers classifier saved locally."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from turbo_eval.methods import method_overrides  # noqa: E402
from turbo_eval.models import load_model  # noqa: E402
from turbo_eval.suite import parse_suite  # noqa: E402
from turbo_eval.tasks import TASK_KINDS  # noqa: E402


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    path = tmp_path_factory.mktemp("cls") / "tiny-vit"
    transformers.ViTForImageClassification(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for label, name in enumerate(["n01", "n02", "n03"]):
        (root / name).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            pixels[..., label] = 255  # a class-coloured channel
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def run_task(model, folder, overrides):
    suite = parse_suite(
        f'[[models]]\nname = "x"\n[[tasks]]\nkind = "classification"\n'
        f'model = "x"\nroot = "{folder}"\n',
        "s.toml",
        "toml",
    )
    task = TASK_KINDS["classification"](suite.tasks[0].options, model, seed=0, batch_size=5)
    facts = task.prepare(lambda it, _: it)
    model.set_method(overrides)
    return facts, task, task.evaluate(lambda it, _: it)


def test_top1_equals_a_direct_computation(classifier_dir, image_folder):
    model = load_model(str(classifier_dir))
    facts, task, metrics = run_task(model, image_folder, None)
    assert facts["images"] == 12 and facts["classes"] == 3
    with torch.no_grad():
        logits = model.module(pixel_values=model.prepare(task.images)).logits
    expected = float((logits.argmax(-1) == torch.arange(3).repeat_interleave(4)).float().mean())
    assert metrics["top1"] == pytest.approx(expected)


def test_patched_classifier_runs_and_counts_tokens(classifier_dir, image_folder):
    model = load_model(str(classifier_dir))
    suite = parse_suite(
        '[[models]]\nname = "x"\nr = [3]\n[[tasks]]\nkind = "fidelity"\nmodel = "x"\n',
        "s.toml",
        "toml",
    )
    _, _, metrics = run_task(model, image_folder, method_overrides("turbo", 3, suite))
    assert 0.0 <= metrics["top1"] <= 1.0
    assert model.handle is not None and model.handle.last_state.token_counts == [14, 11]


def test_classification_requires_root():
    from turbo_eval.suite import SuiteError

    with pytest.raises(SuiteError, match="root"):
        parse_suite(
            '[[models]]\nname = "x"\n[[tasks]]\nkind = "classification"\nmodel = "x"\n',
            "s.toml",
            "toml",
        )
