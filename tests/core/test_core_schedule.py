"""r in one place: every schedule form against a slow oracle, the clip, targets, count rules."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from inputs import make_case
from schedule_oracle import allowed, finals_from, limit, oracle_resolve, oracle_rule, simulate

from turbo_core import (
    PRESETS,
    CountRule,
    Ratio,
    RClippedWarning,
    ResolvedSchedule,
    Target,
    TokenReducer,
    TurboConfig,
    expand_r,
    max_removable,
    resolve_schedule,
)


@dataclasses.dataclass
class Spec:
    r: Any
    num_tokens: int
    num_blocks: int
    protected: int
    min_tokens: int
    kind: str  # how the oracle reads it: "static", "ratio" (thousandths) or "target"
    value: Any

    def resolve(self, rule: CountRule | None = None) -> ResolvedSchedule:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RClippedWarning)
            return resolve_schedule(
                self.r,
                self.num_tokens,
                self.num_blocks,
                protected=self.protected,
                min_tokens=self.min_tokens,
                rule=rule,
            )


@st.composite
def specs(draw, max_tokens: int = 60, max_blocks: int = 6) -> Spec:
    n = draw(st.integers(0, max_tokens))
    blocks = draw(st.integers(1, max_blocks))
    protected = draw(st.integers(0, 4))
    min_tokens = draw(st.one_of(st.just(0), st.integers(0, max_tokens)))
    form = draw(st.sampled_from(["int", "list", "tome", "ratio", "float", "target"]))
    if form == "int":
        r = draw(st.integers(0, n + 3))
        kind, value = "static", [r] * blocks
    elif form == "list":
        r = draw(st.lists(st.integers(0, 20), max_size=blocks))
        kind, value = "static", r + [0] * (blocks - len(r))
    elif form == "tome":
        r = (draw(st.integers(0, 20)), draw(st.floats(-1.0, 1.0)))
        # the static requests are expand_r's own (tested in test_core_config)
        kind, value = "static", list(expand_r(r, blocks))
    elif form in ("ratio", "float"):
        thousandths = draw(st.integers(1, 999))
        r = thousandths / 1000 if form == "float" else Ratio(thousandths / 1000)
        kind, value = "ratio", thousandths
    else:
        target = draw(st.integers(1, max_tokens + 5))
        r, kind, value = Target(target), "target", target
    return Spec(r, n, blocks, protected, min_tokens, kind, value)


# ------------------------------------------------------------------ the oracle


@given(specs())
def test_resolve_matches_the_oracle_for_every_form(spec):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = resolve_schedule(
            spec.r,
            spec.num_tokens,
            spec.num_blocks,
            protected=spec.protected,
            min_tokens=spec.min_tokens,
        )
    requested, applied, counts, clipped = oracle_resolve(
        spec.kind, spec.value, spec.num_tokens, spec.num_blocks, spec.protected, spec.min_tokens
    )
    assert list(got.requested) == requested
    assert list(got.r) == applied
    assert list(got.counts) == counts
    assert [tuple(c) for c in got.clipped] == clipped
    assert got.adjusted is None and got.unadjusted is None and got.meets_rule
    # warned exactly when the bipartite limit clipped something
    clip_warnings = [w for w in caught if issubclass(w.category, RClippedWarning)]
    assert len(clip_warnings) == (1 if clipped else 0)
    if clipped:
        block, want, have = clipped[0]
        assert f"block {block}: r={want} clipped to {have}" in str(clip_warnings[0].message)


@given(specs(), st.one_of(st.none(), st.tuples(st.integers(1, 5), st.integers(0, 3))))
def test_counts_never_go_below_the_protected_tokens(spec, rule_args):
    rule = None if rule_args is None else CountRule(*rule_args)
    got = spec.resolve(rule)
    floor = min(spec.num_tokens, spec.protected)
    assert len(got.r) == len(got.counts) == spec.num_blocks
    assert min(got.counts) >= floor
    # every block stays within the one limit, for the count that actually enters it
    entering = [spec.num_tokens, *got.counts[:-1]]
    for removed, count in zip(got.r, entering, strict=True):
        assert 0 <= removed <= limit(count, spec.protected, spec.min_tokens)
    assert list(got.counts) == simulate(spec.num_tokens, got.r)


def test_max_removable_is_the_documented_rule():
    # (N - protected) // 2, nothing below the threshold, never negative
    assert max_removable(197, 1, 0) == 98
    assert max_removable(10, 0, 0) == 5
    assert max_removable(11, 0, 0) == 5
    assert max_removable(1, 1, 0) == 0
    assert max_removable(2, 5, 0) == 0
    assert max_removable(39, 1, 40) == 0
    assert max_removable(40, 1, 40) == 19


# --------------------------------------------------------------------- targets


@given(specs(max_tokens=40, max_blocks=5).filter(lambda s: s.kind == "target"))
def test_target_is_reached_whenever_some_schedule_reaches_it(spec):
    got = spec.resolve()
    target = spec.value
    every = (True,) * spec.num_blocks
    feasible = target <= spec.num_tokens and target in finals_from(
        every, 0, spec.num_tokens, spec.protected, spec.min_tokens
    )
    if feasible:
        assert got.final_tokens == target
        assert got.clipped == ()
    else:
        assert got.final_tokens != target
        # reported: the limit clipped, or there was nothing it could do (count or threshold)
        assert got.clipped or target > spec.num_tokens or spec.min_tokens > 0


def test_target_spreads_the_excess_evenly():
    # 197 -> 101 over 12 blocks: 96 to remove, 8 per block
    got = resolve_schedule(Target(101), 197, 12, protected=1)
    assert got.r == (8,) * 12 and got.final_tokens == 101
    # 10 to remove over 4 blocks: ceil(10/4)=3, ceil(7/3)=3, ceil(4/2)=2, 2
    assert resolve_schedule(Target(10), 20, 4, protected=1).r == (3, 3, 2, 2)
    # already there: nothing to do
    assert resolve_schedule(Target(50), 30, 3, protected=1).r == (0, 0, 0)


def test_target_takes_more_early_only_when_the_even_share_would_miss():
    # 16 tokens to 4 in two blocks: the even share (6, then 6) would stop at 5, since
    # 10 tokens can lose at most 5; only halving twice (8 then 4) gets there.
    got = resolve_schedule(Target(4), 16, 2, protected=0)
    assert got.r == (8, 4) and got.counts == (8, 4) and got.clipped == ()


def test_unreachable_target_is_reported_not_raised():
    with pytest.warns(RClippedWarning, match="block 0: r=9 clipped to 4"):
        got = resolve_schedule(Target(1), 10, 2, protected=1)
    # CLS + 9 tokens can at best go 10 -> 6 -> 4
    assert got.counts == (6, 4)
    assert got.clipped == ((0, 9, 4), (1, 5, 2))


# ---------------------------------------------------------------------- ratios


@given(st.integers(1, 999), st.integers(0, 3000))
def test_ratio_removes_the_floor_of_its_share(thousandths, num_tokens):
    got = resolve_schedule(Ratio(thousandths / 1000), num_tokens, 1, protected=0)
    assert got.requested == ((thousandths * num_tokens) // 1000,)


def test_ratio_floor_examples():
    assert resolve_schedule(Ratio(0.5), 11, 1, protected=0).r == (5,)  # 5.5 -> 5
    assert resolve_schedule(Ratio(0.1), 9, 1, protected=0).r == (0,)  # 0.9 -> 0
    # as written in decimal: 0.29 of 100 is 29 (binary rounding alone would give 28)
    assert resolve_schedule(0.29, 100, 1, protected=0).r == (29,)
    # the share follows the shrinking sequence: 100 -> 75 -> 57 -> 43
    assert resolve_schedule(0.25, 100, 3, protected=1).counts == (75, 57, 43)


# ------------------------------------------------------------------ count rules


@given(
    specs(max_tokens=36, max_blocks=5),
    st.integers(1, 5),
    st.integers(0, 3),
)
def test_count_rule_met_whenever_feasible_with_the_latest_blocks(spec, multiple_of, offset):
    rule = CountRule(multiple_of, offset)
    base = spec.resolve()
    got = spec.resolve(rule)
    # the form, its clipping and its requests are those of the unconstrained schedule
    assert got.requested == base.requested and got.clipped == base.clipped
    outcome, first_changed = oracle_rule(
        list(base.r), spec.num_tokens, spec.protected, spec.min_tokens, multiple_of, offset
    )
    if outcome == "met":
        assert got.r == base.r and got.adjusted is None and got.unadjusted is None
        assert got.meets_rule
    elif outcome == "impossible":
        assert got.r == base.r and got.unadjusted is None
        assert "cannot be met" in got.adjusted
        assert not got.meets_rule
    else:
        goal = outcome
        assert got.final_tokens == goal and got.meets_rule
        assert allowed(got.final_tokens, multiple_of, offset)
        assert got.unadjusted == base.r
        assert f"ends on {goal} instead of {base.final_tokens}" in got.adjusted
        changed = [i for i, (a, b) in enumerate(zip(base.r, got.r, strict=True)) if a != b]
        assert changed and changed[0] == first_changed
        # blocks that did not merge are never made to merge
        assert all(got.r[i] == 0 for i, v in enumerate(base.r) if v == 0)


@pytest.mark.parametrize("r", range(41))
def test_minigpt_v2_count_rule_for_every_r(r):
    """1 CLS + 1024 patches through 39 blocks; 4 patch tokens are concatenated after."""
    rule = CountRule(4, offset=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RClippedWarning)
        plain = resolve_schedule(r, 1025, 39, protected=1)
        got = resolve_schedule(r, 1025, 39, protected=1, rule=rule)
    assert (got.final_tokens - 1) % 4 == 0
    # legal for one bipartite step per block, with the count that enters it
    entering = [1025, *got.counts[:-1]]
    assert all(v <= (n - 1) // 2 for v, n in zip(got.r, entering, strict=True))
    assert list(got.counts) == simulate(1025, got.r)
    # a few tokens either way, recorded, and only when needed
    assert abs(got.final_tokens - plain.final_tokens) < 4
    if (plain.final_tokens - 1) % 4 == 0:
        assert got.r == plain.r and got.adjusted is None
    else:
        assert got.adjusted is not None and got.unadjusted == plain.r
        more = got.final_tokens < plain.final_tokens
        assert ("more token(s) removed" if more else "fewer token(s) removed") in got.adjusted


def test_minigpt_v2_r13_removes_one_more_in_the_last_block():
    # 1025 - 39 * 13 = 518 = 1 + 517 patches; 516 is the nearest multiple of 4 below
    got = resolve_schedule(13, 1025, 39, protected=1, rule=CountRule(4, offset=1))
    assert got.final_tokens == 517
    assert got.r == (13,) * 38 + (14,)
    assert "block 38: 13 -> 14" in got.adjusted


def test_count_rule_removes_fewer_when_more_is_impossible():
    # 7 -> 4 -> 3 with r=(3, 1), protected 1: 3 - 0 is not a multiple of 2 and no block can
    # remove more (4 tokens allow 1); removing one fewer gives 4.
    got = resolve_schedule([3, 1], 7, 2, protected=1, rule=CountRule(2))
    assert got.counts == (4, 4) and got.r == (3, 0)
    assert "1 fewer token(s) removed" in got.adjusted


def test_count_rule_that_cannot_be_met_is_reported():
    # nothing merges (r=0), and 1 + 1023 patches is not a multiple of 4
    got = resolve_schedule(0, 1024, 4, protected=1, rule=CountRule(4, offset=1))
    assert got.r == (0, 0, 0, 0) and not got.meets_rule
    assert "cannot be met" in got.adjusted


# -------------------------------------------------------------------- warnings


def test_no_warning_for_the_threshold_or_an_unreachable_target():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_schedule(30, 39, 3, protected=1, min_tokens=40).r == (0, 0, 0)
        assert resolve_schedule(Target(100), 50, 3, protected=1).r == (0, 0, 0)
        resolve_schedule(13, 1025, 39, protected=1, rule=CountRule(4, offset=1))


def test_clipping_warns_once_naming_the_first_block():
    with pytest.warns(RClippedWarning, match=r"block 1: r=10 clipped to 9, .*2 more block"):
        got = resolve_schedule(10, 30, 4, protected=1)
    # CLS + 29: 30 -> 20 (limit 14), 20 -> 11 (limit 9), 11 -> 6 (limit 5), 6 -> 4 (limit 2)
    assert got.counts == (20, 11, 6, 4)
    assert got.clipped == ((1, 10, 9), (2, 10, 5), (3, 10, 2))


# ------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: Ratio(0.0), ValueError, r"Ratio.fraction must be in \(0, 1\)"),
        (lambda: Ratio(1), ValueError, r"Ratio.fraction must be in \(0, 1\)"),
        (lambda: Ratio(math.nan), ValueError, r"Ratio.fraction must be in \(0, 1\)"),
        (lambda: Ratio("half"), TypeError, r"Ratio.fraction must be a number in \(0, 1\)"),
        (lambda: Target(0), ValueError, "Target.tokens must be an int >= 1"),
        (lambda: Target(2.5), TypeError, "Target.tokens must be an int >= 1"),
        (lambda: CountRule(0), ValueError, "CountRule.multiple_of must be an int >= 1"),
        (lambda: CountRule(4, -1), ValueError, "CountRule.offset must be an int >= 0"),
        (
            lambda: resolve_schedule(4, -1, 3, protected=1),
            ValueError,
            "num_tokens must be an int >= 0",
        ),
        (
            lambda: resolve_schedule(4, 10, 0, protected=1),
            ValueError,
            "num_blocks must be an int >= 1",
        ),
        (
            lambda: resolve_schedule(4, 10, 2, protected=-1),
            ValueError,
            "protected must be an int >= 0",
        ),
        (
            lambda: resolve_schedule(4, 10, 2, protected=1, min_tokens=-2),
            ValueError,
            "min_tokens must be an int >= 0",
        ),
        (
            lambda: resolve_schedule(4, 10, 2, protected=1, rule=4),
            TypeError,
            "rule must be a CountRule or None",
        ),
        (lambda: resolve_schedule(1.5, 10, 2, protected=1), ValueError, r"must be in \(0, 1\)"),
        (
            lambda: TurboConfig(r=Ratio(0.2)).schedule(12),
            ValueError,
            "depends on the token count.*resolve_schedule",
        ),
        (lambda: expand_r(Target(5), 3), ValueError, "depends on the token count"),
        (lambda: TokenReducer().start(0), ValueError, "num_blocks must be an int >= 1"),
        (lambda: TokenReducer().start(2, rule=4), TypeError, "rule must be a CountRule"),
    ],
)
def test_bad_schedule_arguments_name_the_parameter(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_config_accepts_every_form():
    assert TurboConfig(r=0.25).r == Ratio(0.25)
    assert TurboConfig(r=Ratio(0.25)) == TurboConfig(r=0.25)
    assert TurboConfig(r=Target(64)).r == Target(64)
    assert hash(TurboConfig(r=Target(64))) == hash(TurboConfig(r=Target(64)))
    assert TurboConfig(r=[2, 1]).schedule(3) == (2, 1, 0)  # static forms still expand


def test_zero_dim_integer_tensors_are_accepted_as_r():
    assert TurboConfig(r=torch.tensor(3)).r == 3
    assert type(TurboConfig(r=torch.tensor(3)).r) is int  # normalised: the config stays hashable
    assert TurboConfig(r=[torch.tensor(2), 1]).schedule(3) == (2, 1, 0)
    assert TurboConfig(min_tokens=torch.tensor(7, dtype=torch.int32)).min_tokens == 7


def test_numpy_integers_are_accepted_as_r():
    np = pytest.importorskip("numpy")  # not in the core environment; in the adapters one
    assert TurboConfig(r=np.int64(4)).r == 4
    assert TurboConfig(r=(np.int32(4), -1.0)).schedule(2) == (8, 0)
    assert TurboConfig(r=[np.uint8(1), 2]).r == (1, 2)


@pytest.mark.parametrize(
    "value",
    [torch.tensor(True), torch.tensor(2.0), torch.tensor([3]), torch.tensor([[3]])],
    ids=["bool", "float", "1-d", "2-d"],
)
def test_tensors_that_are_not_integer_scalars_are_refused_as_r(value):
    with pytest.raises(TypeError, match="r must be an int >= 0"):
        TurboConfig(r=value)


def test_protected_none_means_the_models_prefix_and_one_for_a_bare_reducer():
    assert TurboConfig().protected is None and TurboConfig().protected_tokens == 1
    assert TurboConfig(protected=5).protected_tokens == 5
    assert TurboConfig(protected=0).protected_tokens == 0
    assert all(preset.protected is None for preset in PRESETS.values())
    # a bare reducer keeps token 0 and halves the rest at most
    x = torch.randn(1, 9, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RClippedWarning)
        bare = TokenReducer(r=10, alpha=0.0)
        out = bare.step(x, x, bare.start(1))
        assert out.shape[1] == 9 - 4 and torch.equal(out[:, 0], x[:, 0])
        five = TokenReducer(r=10, alpha=0.0, protected=5)
        out = five.step(x, x, five.start(1))
    assert out.shape[1] == 9 - 2 and torch.equal(out[:, :5], x[:, :5])


# ------------------------------------------------------ the reducer and state


@given(specs(max_tokens=48, max_blocks=5), st.integers(0, 2**31 - 1), st.booleans())
def test_step_on_real_tensors_follows_the_resolved_counts(spec, seed, with_rule):
    rule = CountRule(2, offset=min(spec.protected, 1)) if with_rule else None
    config = TurboConfig(r=spec.r, alpha=0.5, protected=spec.protected, min_tokens=spec.min_tokens)
    reducer = TokenReducer(config)
    expected = spec.resolve(rule)
    case = make_case(seed, batch=2, tokens=spec.num_tokens, width=6, r=0, protected=0)
    state = reducer.start(spec.num_blocks, rule=rule)
    assert state.resolved is None and state.schedule is None
    x = case.x
    predicted = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RClippedWarning)
        for _ in range(spec.num_blocks):
            predicted.append(reducer.r_now(state, x.shape[1]))
            x = reducer.step(x, x, state, torch.rand(x.shape[:2]).softmax(-1))
    assert state.resolved == expected and state.schedule == expected.r
    assert state.token_counts == list(expected.counts)
    assert state.r_applied == list(expected.r) == predicted
    assert x.shape[1] == expected.final_tokens
    # past the end of the schedule nothing is removed
    assert reducer.r_now(state, x.shape[1]) == 0


def test_resolution_is_lazy_from_the_first_sequence_and_then_fixed():
    reducer = TokenReducer(TurboConfig(r=0.5, alpha=0.0))
    state = reducer.start(2)
    with pytest.raises(RuntimeError, match="not resolved yet"):
        state.r_for_current_block()
    first = reducer.resolve(state, 21)
    assert first.r == (10, 5) and state.r_for_current_block() == 10
    # idempotent: a later count (or another call) does not re-resolve
    assert reducer.resolve(state, 7) is first and reducer.r_now(state, 21) == 10
    x = torch.randn(1, 21, 4)
    x = reducer.step(x, x, state)
    assert x.shape[1] == 11 and reducer.r_now(state, 11) == 5


def test_step_resolves_from_x_when_nobody_resolved_first():
    reducer = TokenReducer(TurboConfig(r=Target(9), alpha=0.0))
    state = reducer.start(2)
    x = torch.randn(3, 17, 4)
    for _ in range(2):
        x = reducer.step(x, x, state)
    assert state.resolved.requested == (4, 4) and state.token_counts == [13, 9]
