"""turbo_eval.methods: each method's Turbo config overrides, read from the one method table
for a suite and for the settings ``bench`` and ``tune`` build from their flags."""

from __future__ import annotations

import pytest

pytest.importorskip("turbo_eval")

from turbo_core import TurboConfig
from turbo_eval.methods import MethodSettings, method_overrides
from turbo_eval.names import METHOD_TABLE
from turbo_eval.suite import parse_suite

SETTINGS = MethodSettings(alpha=(0.3, 5.0), semantic_scale=30.0, fusion="division")

#: written out by hand (the paper's methods as the reference code configures them), not
#: derived from the table
EXPECTED = {
    "baseline": None,
    "redundancy": {"r": 4, "mode": "redundancy", "alpha": 0.0},
    "semantics": {"r": 4, "mode": "semantics"},
    "turbo": {"r": 4, "mode": "turbo", "alpha": 0.3, "semantic_scale": 30.0, "fusion": "division"},
    "tomesd": {"r": 4, "peer": "tomesd"},
    "turbo-cross": {
        "r": 4, "mode": "turbo", "alpha": 0.3, "semantic_scale": 30.0, "fusion": "division",
        "cross_modal": "turbo-cross",
    },
    "redundancy-sizebias": {"r": 4, "mode": "redundancy", "alpha": 0.0, "size_bias": True},
    "int8": {"model_side": "int8"},
    "semantics+prune": {"r": 4, "mode": "semantics", "model_side": "prune"},
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_overrides_of_each_form(method: str) -> None:
    assert method_overrides(method, 4, SETTINGS) == EXPECTED[method]


def test_alpha_and_semantic_norm_reach_turbo_only() -> None:
    settings = MethodSettings(alpha=(5.0,), semantic_scale=30.0, semantic_norm="length")
    assert method_overrides("turbo", 8, settings, alpha=0.5) == {
        "r": 8, "mode": "turbo", "alpha": 0.5, "semantic_scale": 30.0, "fusion": "difference",
        "semantic_norm": "length",
    }  # fmt: skip
    assert method_overrides("redundancy", 8, settings, alpha=0.5) == {
        "r": 8, "mode": "redundancy", "alpha": 0.0,
    }  # fmt: skip


def test_a_suite_and_its_settings_give_the_same_overrides() -> None:
    suite = parse_suite(
        '[suite]\nname = "s"\nalpha = [0.3, 5.0]\nfusion = "division"\n'
        '[[models]]\nname = "m"\n[[tasks]]\nkind = "knn"\nmodel = "m"\n'
    )
    for method in METHOD_TABLE:
        assert method_overrides(method, 4, suite) == method_overrides(method, 4, SETTINGS)


@pytest.mark.parametrize("method", [m for m, i in METHOD_TABLE.items() if i.kind == "plain"])
def test_every_plain_config_is_a_valid_turbo_config(method: str) -> None:
    overrides = method_overrides(method, 4, SETTINGS)
    if overrides is not None:
        TurboConfig(**overrides)  # an unknown key or a value out of range raises


def test_an_unknown_method_is_named() -> None:
    with pytest.raises(ValueError, match="'tome'"):
        method_overrides("tome", 4, SETTINGS)
    with pytest.raises(ValueError, match="model-side step must be one of"):
        method_overrides("turbo+fp8", 4, SETTINGS)
