"""Connector methods (Turbo, VisionZip, DivPrune, CDPruner) against float64 loop oracles."""

from __future__ import annotations

import math

import pytest
import torch
from connector_oracles import (
    cdpruner_kernel,
    divprune_picks,
    dpp_greedy_slow,
    dpp_map_brute,
    logdet,
    turbo_row,
    visionzip_row,
)
from hypothesis import given
from hypothesis import strategies as st

from turbo_core import (
    CONNECTOR_METHODS,
    CDPruner,
    ConnectorInputs,
    DivPrune,
    TurboSelection,
    VisionZip,
    check_reduced,
    dpp_greedy_map,
    get_connector_method,
)

METHODS = ["turbo", "visionzip", "divprune", "cdpruner"]


def make_inputs(batch: int = 2, count: int = 30, width: int = 12, seed: int = 0) -> ConnectorInputs:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, count, width, generator=gen)
    keys = torch.randn(batch, count, 8, generator=gen)
    guide = torch.rand(batch, count, generator=gen).pow(3)
    text = torch.randn(batch, 5, width, generator=gen)
    return ConnectorInputs(features, keys=keys, guide=guide, text=text)


def assert_row(out, b: int, expected, atol: float = 1e-5) -> None:
    tokens, sizes, index = expected
    assert out.index[b].tolist() == index
    assert out.sizes[b].tolist() == pytest.approx(sizes)
    torch.testing.assert_close(out.tokens[b].double(), tokens, atol=atol, rtol=1e-5)


def test_registry_holds_every_method():
    assert set(METHODS) <= set(CONNECTOR_METHODS)
    assert isinstance(get_connector_method("visionzip"), VisionZip)
    with pytest.raises(ValueError, match="unknown connector method 'nope'; known: cdpruner"):
        get_connector_method("nope")


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("budget", [1, 7, 16, 29, 30, 64])
def test_budget_is_exact_and_contract_holds(name, budget):
    inputs = make_inputs()
    out = get_connector_method(name)(inputs, budget)
    check_reduced(inputs, budget, out)
    assert out.tokens.dtype == inputs.features.dtype
    if budget >= 30:  # keep all: unchanged
        assert out.tokens is inputs.features or torch.equal(out.tokens, inputs.features)
        assert out.sizes.eq(1).all()


@pytest.mark.parametrize("name", METHODS)
def test_batch_rows_equal_single_rows(name):
    inputs = make_inputs(batch=3, seed=1)
    method = get_connector_method(name)
    whole = method(inputs, 9)
    for b in range(3):
        single = ConnectorInputs(
            inputs.features[b : b + 1],
            keys=inputs.keys[b : b + 1],
            guide=inputs.guide[b : b + 1],
            text=inputs.text[b : b + 1],
        )
        out = method(single, 9)
        assert torch.equal(out.index[0], whole.index[b])
        torch.testing.assert_close(out.tokens[0], whole.tokens[b])
        torch.testing.assert_close(out.sizes[0], whole.sizes[b])


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(name, dtype):
    base = make_inputs(seed=2)
    inputs = ConnectorInputs(
        base.features.to(dtype),
        keys=base.keys.to(dtype),
        guide=base.guide.to(dtype),
        text=base.text.to(dtype),
    )
    out = get_connector_method(name)(inputs, 8)
    check_reduced(inputs, 8, out)
    assert out.tokens.dtype == dtype
    assert torch.isfinite(out.tokens.float()).all()


def test_missing_inputs_and_bad_budgets_are_named():
    inputs = make_inputs()
    bare = ConnectorInputs(inputs.features)
    with pytest.raises(ValueError, match=r"visionzip needs a guide: inputs\.guide"):
        VisionZip()(bare, 8)
    with pytest.raises(ValueError, match=r"cdpruner needs the instruction: inputs\.text"):
        CDPruner()(bare, 8)
    with pytest.raises(ValueError, match=r"use_keys=True needs inputs\.keys"):
        DivPrune(use_keys=True)(bare, 8)
    with pytest.raises(ValueError, match="budget must be an int >= 1, got 0"):
        TurboSelection()(inputs, 0)
    with pytest.raises(TypeError, match="budget must be an int >= 1"):
        DivPrune()(inputs, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"inputs\.guide must be \(B, N\)"):
        TurboSelection()(ConnectorInputs(inputs.features, guide=inputs.guide[:, :5]), 4)
    with pytest.raises(ValueError, match=r"inputs\.text must be \(B, T, D\)"):
        CDPruner()(ConnectorInputs(inputs.features, text=inputs.text[..., :3]), 4)
    with pytest.raises(ValueError, match=r"inputs\.features must be a floating \(B, N, D\)"):
        DivPrune()(ConnectorInputs(inputs.features[0]), 4)
    with pytest.raises(ValueError, match=r"alpha must be >= 0\.0"):
        TurboSelection(alpha=-1)
    with pytest.raises(ValueError, match="contextual must be <= the budget"):
        VisionZip(contextual=9)(inputs, 8)
    with pytest.raises(ValueError, match=r"theta must be None or in \[0, 1\)"):
        CDPruner(theta=1.0)
    with pytest.raises(ValueError, match="contextual_merge must be"):
        VisionZip(contextual_merge="sum")


# --- Turbo -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "with_guide", "with_keys"),
    [(1.0, True, True), (0.3, True, False), (1.0, False, True)],
)
@pytest.mark.parametrize("budget", [1, 5, 12])
def test_turbo_matches_oracle(alpha, with_guide, with_keys, budget):
    inputs = make_inputs(seed=3)
    if not with_guide:
        inputs = ConnectorInputs(inputs.features, keys=inputs.keys)
    if not with_keys:
        inputs = ConnectorInputs(inputs.features, guide=inputs.guide)
    out = TurboSelection(alpha=alpha)(inputs, budget)
    metric = inputs.keys if inputs.keys is not None else inputs.features
    for b in range(2):
        guide = None if inputs.guide is None else inputs.guide[b]
        assert_row(out, b, turbo_row(inputs.features[b], metric[b], guide, alpha, budget))


def test_turbo_conserves_mass_and_alpha_zero_is_redundancy_only():
    inputs = make_inputs(seed=4)
    out = TurboSelection()(inputs, 10)
    assert out.sizes.sum(-1).tolist() == [30.0, 30.0]
    weighted = (out.tokens * out.sizes.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(weighted, inputs.features.sum(1), atol=1e-4, rtol=1e-5)
    no_guide = TurboSelection()(ConnectorInputs(inputs.features, keys=inputs.keys), 10)
    alpha_zero = TurboSelection(alpha=0)(inputs, 10)
    assert torch.equal(no_guide.index, alpha_zero.index)
    with_guide = TurboSelection(alpha=1.0)(inputs, 10)
    assert not torch.equal(with_guide.index, alpha_zero.index)  # the guide does act


def test_turbo_large_alpha_keeps_the_guided_tokens_and_prune_mode_drops():
    inputs = make_inputs(seed=5)
    out = TurboSelection(alpha=1e6, merge=False)(inputs, 6)
    top = inputs.guide.topk(6, dim=-1).indices.sort(-1).values
    assert torch.equal(out.index, top)
    assert out.sizes.eq(1).all()
    assert torch.equal(out.tokens, inputs.features.gather(1, top.unsqueeze(-1).expand(-1, -1, 12)))


# --- VisionZip ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "contextual", "with_keys"),
    [(64, None, True), (40, None, False), (12, 2, True), (9, 0, True), (5, 5, True)],
)
def test_visionzip_matches_the_released_algorithm(budget, contextual, with_keys):
    inputs = make_inputs(count=96, seed=6)
    if not with_keys:
        inputs = ConnectorInputs(inputs.features, guide=inputs.guide)
    method = VisionZip(contextual=contextual)
    dominant, ctx = method.split(budget)
    if contextual is None:
        assert ctx == round(budget * 10 / 64)  # 54 + 10 at 64 tokens
    out = method(inputs, budget)
    check_reduced(inputs, budget, out)
    metric = inputs.keys if inputs.keys is not None else inputs.features
    for b in range(2):
        expected = visionzip_row(inputs.features[b], metric[b], inputs.guide[b], dominant, ctx)
        assert_row(out, b, expected)


def test_visionzip_published_splits_and_mean_merge():
    assert [VisionZip().split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    inputs = make_inputs(count=60, seed=7)
    out = VisionZip(contextual_merge="mean")(inputs, 16)
    assert out.sizes.sum(-1).tolist() == [60.0, 60.0]  # all tokens accounted for
    # the mean merge conserves mass over the contextual tokens and the kept dominant ones
    weighted = (out.tokens * out.sizes.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(weighted, inputs.features.sum(1), atol=1e-4, rtol=1e-5)


# --- DivPrune ----------------------------------------------------------------------------


@pytest.mark.parametrize(("budget", "use_keys"), [(1, False), (6, False), (17, True)])
def test_divprune_matches_the_greedy_rule(budget, use_keys):
    inputs = make_inputs(seed=8)
    out = DivPrune(use_keys=use_keys)(inputs, budget)
    metric = inputs.keys if use_keys else inputs.features
    for b in range(2):
        picks = sorted(divprune_picks(metric[b], budget))
        assert out.index[b].tolist() == picks
        assert torch.equal(out.tokens[b], inputs.features[b, picks])


def test_divprune_takes_one_token_per_separated_cluster():
    # 6 tight clusters far apart: the max-min optimum (and the greedy) keeps one of each
    gen = torch.Generator().manual_seed(9)
    centres = torch.linalg.qr(torch.randn(16, 6, generator=gen)).Q.T  # orthonormal
    labels = torch.arange(6).repeat_interleave(5)[torch.randperm(30, generator=gen)]
    x = centres[labels] + 0.01 * torch.randn(30, 16, generator=gen)
    out = DivPrune()(ConnectorInputs(x.unsqueeze(0)), 6)
    assert sorted(labels[out.index[0]].tolist()) == list(range(6))


# --- CDPruner ----------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 3, 7])
def test_dpp_greedy_matches_the_slow_greedy(budget):
    gen = torch.Generator().manual_seed(10)
    for _ in range(4):
        v = torch.randn(2, 11, 8, generator=gen)  # rank 8 >= every budget
        kernel = v @ v.transpose(-1, -2)
        picks = dpp_greedy_map(kernel, budget)
        for b in range(2):
            assert picks[b].tolist() == dpp_greedy_slow(kernel[b], budget)


def test_dpp_greedy_is_within_the_volume_bound_of_the_brute_force_map():
    # greedy volume >= optimal volume / k! (Civril & Magdon-Ismail), i.e. for log det:
    # logdet(greedy) >= logdet(MAP) - 2 log k!; exact for k = 1
    gen = torch.Generator().manual_seed(11)
    exact = 0
    for trial in range(6):
        v = torch.randn(9, 5, generator=gen)
        kernel = (v @ v.T).unsqueeze(0)
        for k in (1, 2, 3):
            picks = dpp_greedy_map(kernel, k)[0].tolist()
            best, value = dpp_map_brute(kernel[0], k)
            got = logdet(kernel[0], picks)
            assert got <= value + 1e-9
            assert got >= value - 2 * math.lgamma(k + 1) - 1e-9, (trial, k)
            if k == 1:
                assert picks == best
            exact += sorted(picks) == best
    assert exact >= 12  # greedy usually finds the MAP itself on such small sets


def test_dpp_greedy_returns_distinct_items_on_a_rank_deficient_kernel():
    v = torch.randn(1, 20, 3)
    picks = dpp_greedy_map(v @ v.transpose(-1, -2), 10)
    assert len(set(picks[0].tolist())) == 10


@pytest.mark.parametrize("budget", [2, 6])
def test_cdpruner_matches_the_slow_conditional_dpp(budget):
    inputs = make_inputs(count=14, seed=12)
    out = CDPruner()(inputs, budget)
    for b in range(2):
        kernel = cdpruner_kernel(inputs.features[b], inputs.text[b])
        assert out.index[b].tolist() == sorted(dpp_greedy_slow(kernel, budget))


def test_cdpruner_text_mask_ignores_padding_and_theta_acts():
    inputs = make_inputs(seed=13)
    padded_text = torch.cat([inputs.text, torch.randn(2, 3, 12)], dim=1)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :5] = True
    padded = ConnectorInputs(inputs.features, text=padded_text, text_mask=mask)
    plain = CDPruner()(ConnectorInputs(inputs.features, text=inputs.text), 10)
    assert torch.equal(CDPruner()(padded, 10).index, plain.index)
    unmasked = CDPruner()(ConnectorInputs(inputs.features, text=padded_text), 10)
    assert not torch.equal(unmasked.index, plain.index)
    assert not torch.equal(CDPruner(theta=0.9)(inputs, 10).index, plain.index)


@given(
    batch=st.integers(1, 3),
    count=st.integers(1, 40),
    width=st.integers(1, 9),
    budget=st.integers(1, 45),
    seed=st.integers(0, 2**16),
)
def test_every_method_keeps_the_contract_on_any_shape(batch, count, width, budget, seed):
    inputs = make_inputs(batch, count, width, seed)
    for name in METHODS:
        out = get_connector_method(name)(inputs, budget)
        check_reduced(inputs, budget, out)
        assert torch.isfinite(out.tokens).all(), name
        # the merging methods account for every token (VisionZip: when it has contextual ones)
        merges = name == "turbo" or (name == "visionzip" and VisionZip().split(budget)[1] > 0)
        if merges or budget >= count:
            torch.testing.assert_close(out.sizes.sum(-1), torch.full((batch,), float(count)))
