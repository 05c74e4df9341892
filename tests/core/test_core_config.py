"""Config validation, schedules and presets; bad input raises errors naming the parameter."""

from __future__ import annotations

import inspect
import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from turbo_core import PRESETS, RClippedWarning, TokenReducer, TurboConfig, expand_r


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": -1}, "r must be an int >= 0"),
        ({"r": [3, -2]}, r"r\[1\] must be an int >= 0"),
        ({"r": 2.5}, r"r as a float .* must be in \(0, 1\)"),
        ({"r": 1.0}, r"must be in \(0, 1\).*got 1.0"),
        ({"r": 0.0}, r"must be in \(0, 1\).*got 0.0"),
        ({"r": math.nan}, r"must be in \(0, 1\)"),
        ({"r": "8"}, r"r must be an int >= 0 \(tokens per block\), a list of them"),
        ({"r": True}, r"r must be an int >= 0"),
        ({"r": (8, 1.5)}, r"r\[1\] \(inflection\) must be <= 1.0"),
        ({"alpha": math.nan}, "alpha must be a finite number"),
        ({"alpha": -0.1}, "alpha must be >= 0.0"),
        ({"fusion": "S9"}, "fusion must be one of"),
        ({"mode": "fast"}, "mode must be one of"),
        ({"min_tokens": -3}, "min_tokens must be an int >= 0"),
        ({"protected": -1}, r"protected must be None \(the model's prefix tokens\) or an int >= 0"),
        ({"protected": 1.0}, r"protected must be None .* or an int >= 0, got 1.0"),
        ({"beta": math.inf}, "beta must be a finite number"),
        ({"prop_attn": 1}, "prop_attn must be a bool"),
        (
            {"alpha": 1e200, "semantic_scale": 1e200},  # each finite, the product is not
            r"alpha \* semantic_scale must be <= 1e\+300",
        ),
    ],
)
def test_bad_config_names_the_parameter(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TurboConfig(**kwargs)


def test_aliases_and_enums_normalise():
    assert TurboConfig(fusion="S3").fusion.value == "product"
    assert TurboConfig(mode="tome").mode.value == "redundancy"
    assert TurboConfig(r=[1, 2]).r == (1, 2)


def test_config_is_immutable_and_hashable():
    config = TurboConfig(r=[4, 4], alpha=2)
    with pytest.raises(AttributeError):
        config.alpha = 3.0  # type: ignore[misc]
    assert hash(config) == hash(TurboConfig(r=(4, 4), alpha=2.0))
    with pytest.raises(TypeError, match="unknown TurboConfig field"):
        config.replace(alfa=1.0)


def test_schedules():
    assert expand_r(5, 4) == (5, 5, 5, 5)
    assert expand_r([3, 2], 4) == (3, 2, 0, 0)
    assert expand_r((8, 0.0), 3) == (8, 8, 8)
    decreasing = expand_r((8, -1.0), 5)  # from 2r down to 0, same total as constant r
    assert decreasing == (16, 12, 8, 4, 0)
    with pytest.raises(ValueError, match="r lists 3 blocks but the model has 2"):
        expand_r([1, 1, 1], 2)
    with pytest.raises(ValueError, match="num_blocks must be an int >= 1"):
        expand_r(3, 0)


@given(st.integers(0, 40), st.floats(-1, 1), st.integers(2, 24))
def test_inflected_schedule_is_monotone_and_keeps_the_budget(r, inflection, blocks):
    schedule = expand_r((r, inflection), blocks)
    assert len(schedule) == blocks and min(schedule) >= 0
    steps = [b - a for a, b in itertools.pairwise(schedule)]
    assert all(s <= 1 for s in steps) if inflection <= 0 else all(s >= -1 for s in steps)
    assert abs(sum(schedule) - r * blocks) <= blocks  # truncation loses < 1 per block


def test_presets_document_the_reference_scale():
    reference = TurboConfig.from_preset("reference")
    paper = TurboConfig.from_preset("paper")
    assert reference.semantic_weight == paper.semantic_weight == 150.0
    assert TurboConfig.from_preset("reference-blip-vqa").r == 40
    assert TurboConfig.from_preset("reference-minigpt-v2", r=6).r == 6
    assert PRESETS["tome"].uses_semantics is False
    with pytest.raises(ValueError, match="unknown preset 'nope'; available"):
        TurboConfig.from_preset("nope")


def test_bad_tensors_name_the_parameter():
    reducer = TokenReducer(r=2)
    x = torch.randn(2, 9, 4)
    state = reducer.start(1)
    with pytest.raises(ValueError, match=r"x must be 3-D \(batch, tokens, channels\)"):
        reducer.step(x[0], x, state)
    with pytest.raises(ValueError, match=r"metric has \(B, N\) = \(2, 8\) but x has \(2, 9\)"):
        reducer.step(x, x[:, :8], state)
    with pytest.raises(ValueError, match=r"semantic must have shape \(B, N\)"):
        reducer.plan(x, torch.rand(2, 5), 2)
    with pytest.raises(ValueError, match="needs the semantic row"):
        reducer.plan(x, None, 2)
    with pytest.raises(ValueError, match="r must be an int >= 0"):
        reducer.plan(x, torch.rand(2, 9), -1)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        reducer.step([[1.0]], x, state)  # type: ignore[arg-type]
    plan = reducer.plan(x, torch.rand(2, 9), 2)
    with pytest.raises(ValueError, match="but the plan was made for"):
        reducer.merge(torch.randn(2, 7, 4), plan)
    with pytest.raises(ValueError, match=r"y must be \(B, 7, C\)"):
        reducer.restore(torch.randn(2, 9, 4), plan)


def test_replaceable_roles_are_used():
    calls = []

    class CountingRestorer:
        def restore(self, y, plan):
            calls.append(plan.r)
            return y.gather(1, plan.assignment()[..., None].expand(-1, -1, y.shape[-1]))

    reducer = TokenReducer(TurboConfig(r=3, alpha=0.0), restorer=CountingRestorer())
    x = torch.randn(1, 10, 4)
    plan = reducer.plan(x, None, 3)
    assert reducer.restore(reducer.merge(x, plan), plan).shape == x.shape
    assert calls == [3]


def test_states_are_independent_between_forwards():
    reducer = TokenReducer(TurboConfig(r=2, alpha=0.0, trace_source=True))
    x = torch.randn(1, 12, 4)
    first, second = reducer.start(2), reducer.start(2)
    reducer.step(x, x, first)
    assert second.block_index == 0 and second.size is None and second.source is None
    out = reducer.step(x, x, second)
    assert out.shape[1] == 10 and first.block_index == second.block_index == 1


def _clip_warnings(run) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a reducer's own once, not the filter's
        run()
    return [w for w in caught if issubclass(w.category, RClippedWarning)]


def test_clip_warning_is_said_once_per_reducer_at_the_callers_line():
    reducer = TokenReducer(TurboConfig(r=10, alpha=0.0, protected=1))
    x = torch.randn(1, 9, 4)
    line = inspect.currentframe().f_lineno + 1
    first = _clip_warnings(lambda: reducer.step(x, x, reducer.start(1)))
    assert len(first) == 1 and "r=10 clipped to 4" in str(first[0].message)
    assert (first[0].filename, first[0].lineno) == (__file__, line)
    # after a catch_warnings block (which resets the registry), and on every entry point
    assert _clip_warnings(lambda: reducer.step(x, x, reducer.start(1))) == []
    assert _clip_warnings(lambda: reducer.r_now(reducer.start(1), 9)) == []
    again = TokenReducer(reducer.config)  # another reducer (a new setting) says it again
    line = inspect.currentframe().f_lineno + 1
    (said,) = _clip_warnings(lambda: again.resolve(again.start(1), 9))
    assert (said.filename, said.lineno) == (__file__, line)


def test_s4_weight_beyond_float64_is_refused_naming_beta():
    config = TurboConfig(r=2, fusion="s4", beta=1e10, gamma=40.0, alpha=1.0, protected=1)
    metric = torch.randn(1, 9, 4)
    with pytest.raises(ValueError, match=r"S4's weight beta \*\* \|gamma - block\|.*lower beta"):
        TokenReducer(config).plan(metric, torch.rand(1, 9).softmax(-1), 2)


def test_clipping_r_is_reported():
    import warnings

    from turbo_core import RClippedWarning

    reducer = TokenReducer(TurboConfig(r=10, alpha=0.0, protected=1))
    x = torch.randn(1, 9, 4)
    with pytest.warns(RClippedWarning, match="r=10 clipped to 4"):
        out = reducer.step(x, x, reducer.start(1))
    assert out.shape[1] == 5
    below = TokenReducer(TurboConfig(r=10, alpha=0.0, min_tokens=20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the threshold is by design: no warning
        assert below.step(x, x, below.start(1)).shape[1] == 9
