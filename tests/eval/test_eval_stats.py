"""Paired bootstrap intervals: a hand-computed case and seeded properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbo_eval.stats import paired_difference


def test_hand_computed_bootstrap_distribution():
    # differences (0, 0, 0, 1): a resample's mean is K/4 with K ~ Binomial(4, 1/4), so
    # P(K <= 2) = 0.949 and P(K <= 3) = 0.996: the 97.5 % point is 3/4, the 2.5 % one 0
    interval = paired_difference([1, 0, 0, 0], [0, 0, 0, 0], seed=3)
    assert interval.mean == pytest.approx(0.25)
    assert (interval.low, interval.high) == (0.0, 0.75)
    assert not interval.excludes_zero and interval.n == 4


def test_two_items_cover_every_resample():
    # differences (0, 1): resample means 0, 1/2, 1 with P 1/4, 1/2, 1/4
    interval = paired_difference([5.0, 6.0], [5.0, 5.0])
    assert (interval.low, interval.mean, interval.high) == (0.0, 0.5, 1.0)


def test_large_sample_matches_the_normal_interval():
    rng = np.random.default_rng(7)
    a = rng.normal(size=2000)
    b = a + rng.normal(0.1, 0.5, size=2000)
    interval = paired_difference(b, a)
    diff = b - a
    half = 1.96 * diff.std(ddof=1) / math.sqrt(diff.size)  # textbook normal interval
    assert interval.mean == pytest.approx(diff.mean())
    assert interval.half_width == pytest.approx(half, rel=0.1)
    assert (interval.low + interval.high) / 2 == pytest.approx(diff.mean(), abs=0.1 * half)
    assert interval.excludes_zero


scores = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=3, max_size=60)


@settings(max_examples=30, deadline=None)
@given(values=scores, seed=st.integers(0, 2**16))
def test_identical_methods_contain_zero(values, seed):
    interval = paired_difference(values, values, seed=seed)
    assert interval.low <= 0.0 <= interval.high and not interval.excludes_zero


@settings(max_examples=30, deadline=None)
@given(
    values=scores,
    noise=st.lists(st.floats(0.0, 0.1, allow_nan=False), min_size=3, max_size=60),
    shift=st.floats(0.11, 1.0),
    sign=st.sampled_from([-1.0, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_noisy_copy_contains_zero_and_shifted_copy_excludes_it(values, noise, shift, sign, seed):
    n = min(len(values), len(noise))
    a = np.asarray(values[:n])
    # symmetric noise (+e and -e) has mean exactly 0: the interval must straddle 0
    jitter = np.concatenate([noise[:n], -np.asarray(noise[:n])])
    twin = np.concatenate([a, a])
    same = paired_difference(twin + jitter, twin, seed=seed)
    assert same.low <= 1e-12 and same.high >= -1e-12
    # shifted by more than the noise: every difference has one sign, so the interval does
    shifted = paired_difference(twin + jitter + sign * shift, twin, seed=seed)
    assert shifted.excludes_zero and np.sign(shifted.mean) == sign


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([1, 2], [1]), {}, "a and b must be 1-d with one score per item"),
        (([1], [1]), {}, "at least 2 paired items"),
        (([1, math.nan], [1, 2]), {}, "must be finite"),
        (([1, 2], [1, 3]), {"confidence": 1.0}, r"confidence must be in \(0, 1\)"),
        (([1, 2], [1, 3]), {"n_resamples": 10}, "n_resamples must be an int >= 100"),
    ],
)
def test_bad_input_names_the_parameter(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(*args, **kwargs)


def test_grouped_items_resample_whole_groups():
    """Oracle: ten exact copies of each group's difference carry no more information than one
    copy, so the cluster interval matches scipy's interval over the 200 group values, while
    treating the copies as independent makes it about sqrt(10) times too narrow."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    per_group = rng.normal(0.1, 1.0, size=200)
    a = np.repeat(per_group, 10)
    b = np.zeros_like(a)
    groups = np.repeat(np.arange(200), 10)
    clustered = paired_difference(a, b, groups=groups, n_resamples=20000)
    naive = paired_difference(a, b, n_resamples=20000)
    oracle = bootstrap(
        (per_group,), np.mean, n_resamples=20000, method="percentile", rng=np.random.default_rng(1)
    ).confidence_interval
    assert clustered.mean == pytest.approx(per_group.mean())
    width = oracle.high - oracle.low
    assert clustered.low == pytest.approx(oracle.low, abs=0.05 * width)
    assert clustered.high == pytest.approx(oracle.high, abs=0.05 * width)
    assert 2.5 < (clustered.high - clustered.low) / (naive.high - naive.low) < 4.0


def test_groups_of_one_item_agree_with_the_paired_bootstrap():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 2, 3000).astype(float), rng.integers(0, 2, 3000).astype(float)
    plain = paired_difference(a, b, n_resamples=20000)
    single = paired_difference(a, b, groups=np.arange(3000), n_resamples=20000)
    width = plain.high - plain.low
    assert single.low == pytest.approx(plain.low, abs=0.05 * width)
    assert single.high == pytest.approx(plain.high, abs=0.05 * width)


def test_groups_must_name_each_item_and_hold_two_groups():
    a, b = np.array([1.0, 0.0, 1.0]), np.zeros(3)
    with pytest.raises(ValueError, match="groups must name one group per item"):
        paired_difference(a, b, groups=[0, 1])
    with pytest.raises(ValueError, match="at least 2 distinct groups"):
        paired_difference(a, b, groups=[4, 4, 4])
