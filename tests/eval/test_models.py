"""turbo_eval.models: the model registry (sources looked up in order, lazily, with
third-party sources in front through register_model_source or the entry-point group)."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("turbo_eval")

from turbo_eval import models
from turbo_eval.models import ModelSource, load_model, register_model_source

PLUGIN = """
import torch
from torch import nn

from turbo_eval.loaded_model import LoadedModel

ASKED = []


def claims(name, options):
    ASKED.append(name)
    return name.startswith("toy:")


def load(name, resolution, options):
    module = nn.Linear(3, 2)  # created under the suite's seed by load_model
    return LoadedModel(
        name, module, "image", prepare=lambda items: torch.ones(len(items), 3),
        forward_features=lambda m, x, handle: m(x),
    )
"""


@pytest.fixture
def isolated_sources(monkeypatch, tmp_path: Path):
    """The registry as it is, restored after the test; a plugin module on sys.path."""
    monkeypatch.setattr(models, "MODEL_SOURCES", list(models.MODEL_SOURCES))
    monkeypatch.setattr(models, "_entry_points_loaded", True)
    (tmp_path / "turbo_eval_toy_source.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "turbo_eval_toy_source", raising=False)
    importlib.invalidate_caches()
    return tmp_path


def test_a_registered_source_is_asked_first_and_loads_under_the_seed(isolated_sources) -> None:
    source = ModelSource("toy", "turbo_eval_toy_source:claims", "turbo_eval_toy_source:load")
    assert register_model_source(source) is source and models.MODEL_SOURCES[0] is source
    first = load_model("toy:one", options={"x": 1}, seed=3)
    again = load_model("toy:one", seed=3)
    assert first.name == "toy:one" and first.options == {"x": 1}
    assert torch.equal(first.module.weight, again.module.weight)  # same seed, same weights
    assert not torch.equal(first.module.weight, load_model("toy:one", seed=4).module.weight)
    assert torch.equal(first.features([0, 1]), first.module(torch.ones(2, 3)))
    with pytest.raises(ValueError, match="unknown model 'nope-xyz': use one of the embedded"):
        load_model("nope-xyz")
    assert sys.modules["turbo_eval_toy_source"].ASKED[-1] == "nope-xyz"  # asked, declined
    with pytest.raises(TypeError, match="source must be a ModelSource, got str"):
        register_model_source("turbo_eval_toy_source:claims")


def test_entry_point_sources_are_registered_on_first_lookup(isolated_sources, monkeypatch) -> None:
    (isolated_sources / "turbo_eval_toy_entry.py").write_text(
        "from turbo_eval.models import ModelSource\n"
        "SOURCE = ModelSource('toy', 'turbo_eval_toy_source:claims', "
        "'turbo_eval_toy_source:load')\n"
    )
    dist = isolated_sources / "turbo_eval_toy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: turbo-eval-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[turbo_eval.models]\ntoy = turbo_eval_toy_entry:SOURCE\n"
    )
    importlib.invalidate_caches()
    monkeypatch.setattr(models, "_entry_points_loaded", False)
    assert load_model("toy:two").name == "toy:two"
    assert models.MODEL_SOURCES[0].name == "toy"
    count = len(models.MODEL_SOURCES)
    load_model("toy:three")
    assert len(models.MODEL_SOURCES) == count  # the entry points are read once


def test_the_built_in_sources_keep_their_order() -> None:
    names = [source.name for source in models.MODEL_SOURCES]
    assert names == [
        "diffusion pipeline", "vision-language", "easyvqa-real", "embedded", "transformers", "timm"
    ]  # fmt: skip
