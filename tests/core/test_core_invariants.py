"""Property tests of the invariants every merge must keep."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from inputs import cases, fusions, make_case, modes

from turbo_core import BipartiteMatcher, TokenReducer, TokenScores, TurboConfig, guide_attention
from turbo_core.testing import oracle_merge, oracle_plan


def reducer_for(case, **kw) -> TokenReducer:
    return TokenReducer(TurboConfig(protected=case.protected, **kw))


def tolerance(dtype: torch.dtype) -> dict:
    return {
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
        torch.float16: dict(rtol=3e-3, atol=3e-3),
    }[dtype]


@given(cases(), st.integers(0, 45))
def test_output_length_follows_clipped_r_and_threshold(case, min_tokens):
    reducer = reducer_for(case, r=case.r, alpha=1.0, min_tokens=min_tokens)
    state = reducer.start(num_blocks=1)
    out = reducer.step(case.x, case.metric, state, case.semantic)
    n, p = case.tokens, case.protected
    expected_r = 0 if n < min_tokens else min(case.r, max((n - p) // 2, 0))
    assert out.shape == (case.batch, n - expected_r, case.x.shape[-1])
    assert state.r_applied == [expected_r]
    assert state.token_counts == [n - expected_r]


@given(cases(max_tokens=60), st.lists(st.integers(0, 12), min_size=1, max_size=6))
def test_sizes_sum_to_original_count_after_successive_merges(case, schedule):
    reducer = reducer_for(case, r=schedule, alpha=0.5)
    state = reducer.start(num_blocks=len(schedule))
    x, metric = case.x, case.metric
    for _ in schedule:
        sem = torch.rand(x.shape[:2]).softmax(-1)
        x = reducer.step(x, metric, state, sem)
        metric = x  # later blocks measure similarity on the merged features
    sizes = state.sizes_for(x)
    assert torch.equal(sizes.sum(dim=(1, 2)), torch.full((case.batch,), float(case.tokens)))
    assert (sizes >= 1).all()


@given(cases())
def test_merge_conserves_size_weighted_mass(case):
    reducer = reducer_for(case, r=case.r, alpha=2.0)
    state = reducer.start(num_blocks=2)
    x1 = reducer.step(case.x, case.metric, state, case.semantic)
    before = (state.sizes_for(x1) * x1.double()).sum(dim=1)
    x2 = reducer.step(x1, x1, state, torch.rand(x1.shape[:2]).softmax(-1))
    after = (state.sizes_for(x2) * x2.double()).sum(dim=1)
    scale = case.x.double().abs().sum(dim=1) + 1
    torch.testing.assert_close(after / scale, before / scale, **tolerance(case.x.dtype))


@given(cases(), modes, fusions)
def test_protected_tokens_stay_first_and_unchanged(case, mode, fusion):
    reducer = reducer_for(case, r=case.r, alpha=3.0, mode=mode, fusion=fusion)
    state = reducer.start(num_blocks=1)
    out = reducer.step(case.x, case.metric, state, case.semantic)
    p = case.protected
    assert torch.equal(out[:, :p], case.x[:, :p])
    if p:
        assert torch.equal(state.sizes_for(out)[:, :p], torch.ones(case.batch, p, 1))


@given(
    cases(),
    modes,
    fusions,
    st.integers(-3, 145),  # alpha = 10 ** this
    st.integers(-3, 145),  # semantic_scale = 10 ** this: products up to 1e290
    st.floats(0.0, 2.0),  # beta ** |gamma - 0| <= 32: S4's weight stays below 1e300
    st.floats(-5, 5),
)
def test_protected_tokens_never_merge_under_extreme_weights(
    case, mode, fusion, alpha_exp, scale_exp, beta, gamma
):
    """Weights whose product overflows float32 (1e40 and beyond) still rank, and whatever
    the scores, the protected tokens stay first, unmerged."""
    config = TurboConfig(
        r=case.r,
        alpha=10.0**alpha_exp,
        semantic_scale=10.0**scale_exp,
        mode=mode,
        fusion=fusion,
        beta=beta,
        gamma=gamma,
        protected=case.protected,
    )
    plan = TokenReducer(config).plan(case.metric, case.semantic, case.r)
    p, batch = case.protected, case.batch
    assert (plan.merged_idx >= p).all()
    assert torch.equal(plan.kept_idx[:, :p], torch.arange(p).expand(batch, p))
    every = torch.cat([plan.kept_idx, plan.merged_idx], dim=1).sort(dim=1).values
    assert torch.equal(every, torch.arange(case.tokens).expand(batch, -1))  # a partition


def test_overflowing_semantic_weight_ranks_like_semantics_only():
    """alpha * semantic_scale = 1e40 is inf in float32: the fusion runs in float64, where
    the semantic term decides, so the plan is the semantics-only plan (the issue's case:
    every float32 score was -inf and the protected CLS merged)."""
    case = make_case(seed=3, batch=2, tokens=17, width=8, r=6, protected=1)
    expected = reducer_for(case, mode="semantics").plan(case.metric, case.semantic, case.r)
    for fusion in ("difference", "layer_dynamic"):
        huge = reducer_for(case, alpha=1e20, semantic_scale=1e20, fusion=fusion)
        plan = huge.plan(case.metric, case.semantic, case.r)
        assert torch.equal(plan.merged_idx, expected.merged_idx)
        assert (plan.merged_idx >= case.protected).all()


@pytest.mark.parametrize("fill", [-math.inf, math.inf, math.nan])
def test_matcher_never_merges_protected_tokens_whatever_the_scores(fill):
    protected, tokens, r = 3, 12, 4
    degree = torch.full((2, (tokens + 1) // 2), fill)
    partner = torch.zeros(2, (tokens + 1) // 2, dtype=torch.long) + protected // 2
    plan = BipartiteMatcher().match(TokenScores(degree, partner, tokens, protected), r)
    assert plan.r == r
    assert (plan.merged_idx >= protected).all()
    assert torch.equal(plan.kept_idx[:, :protected], torch.arange(protected).expand(2, -1))
    assert sorted(plan.kept_idx[0].tolist() + plan.merged_idx[0].tolist()) == list(range(tokens))


@given(cases(), modes)
def test_r_zero_is_bitwise_identity(case, mode):
    reducer = reducer_for(case, r=0, alpha=1.0, mode=mode, trace_source=True)
    state = reducer.start(num_blocks=3)
    x = case.x
    for _ in range(3):
        x = reducer.step(x, case.metric, state, case.semantic)
    assert x is case.x or torch.equal(x, case.x)
    assert state.size is None and state.token_counts == [case.tokens] * 3


@given(cases(), fusions)
def test_alpha_zero_gives_the_redundancy_only_plan(case, fusion):
    turbo = reducer_for(case, alpha=0.0, fusion=fusion).plan(case.metric, case.semantic, case.r)
    tome = reducer_for(case, mode="redundancy").plan(case.metric, None, case.r)
    assert torch.equal(turbo.kept_idx, tome.kept_idx)
    assert torch.equal(turbo.merged_idx, tome.merged_idx)
    assert torch.equal(turbo.merged_into, tome.merged_into)


def _well_separated(values: list[float], gap: float) -> bool:
    ordered = sorted(values)
    return all(b - a > gap for a, b in itertools.pairwise(ordered))


@given(
    cases(dtypes=[torch.float32]),
    modes,
    fusions,
    st.floats(0.0, 40.0),
    st.integers(0, 11),
    st.integers(0, 30),
)
def test_vectorised_matcher_agrees_with_loop_oracle(case, mode, fusion, alpha, block, min_tokens):
    config = TurboConfig(
        protected=case.protected,
        alpha=alpha,
        mode=mode,
        fusion=fusion,
        beta=0.8,
        gamma=3.0,
        min_tokens=min_tokens,
    )
    expected = oracle_plan(
        case.metric,
        case.semantic,
        case.r,
        case.protected,
        mode,
        fusion,
        config.semantic_weight,
        0.8,
        3.0,
        block,
        min_tokens,
    )
    # Near-ties are decided by float rounding, not by the algorithm: skip those draws.
    from turbo_core.testing import _cosine, degree_of

    for b in range(case.batch):
        m = case.metric[b].double().tolist()
        n = len(m)
        b_pos = [j for j in range(1, n, 2) if j >= case.protected]
        degrees = []
        for i in range(case.protected + (case.protected % 2), n, 2):
            sims = [_cosine(m[i], m[j]) for j in b_pos]
            assume(_well_separated(sims, 1e-4))
            if sims:
                degrees.append(
                    degree_of(
                        max(sims),
                        float(case.semantic[b, i]),
                        mode,
                        fusion,
                        config.semantic_weight,
                        0.8,
                        3.0,
                        block,
                    )
                )
        assume(_well_separated(degrees, 1e-4))
    plan = TokenReducer(config).plan(case.metric, case.semantic, case.r, block_index=block)
    for b, (kept, merged, into) in enumerate(expected):
        assert plan.kept_idx[b].tolist() == kept
        assert plan.merged_idx[b].tolist() == merged
        assert plan.merged_into[b].tolist() == into


@given(cases(dtypes=[torch.float32]))
def test_merged_values_match_slow_weighted_average(case):
    reducer = reducer_for(case, r=case.r, alpha=1.0)
    plan = reducer.plan(case.metric, case.semantic, case.r)
    size = torch.randint(1, 5, (case.batch, case.tokens, 1)).float()
    out, out_size = reducer.merger.merge(case.x, plan, size)
    for b in range(case.batch):
        plan_b = (
            plan.kept_idx[b].tolist(),
            plan.merged_idx[b].tolist(),
            plan.merged_into[b].tolist(),
        )
        expected_x, expected_size = oracle_merge(case.x[b], size[b], plan_b)
        torch.testing.assert_close(out[b].double(), expected_x, rtol=1e-5, atol=1e-5)
        assert torch.equal(out_size[b].double(), expected_size)


@given(cases(max_tokens=60), st.lists(st.integers(0, 12), min_size=1, max_size=5))
def test_source_tracking_is_a_partition(case, schedule):
    reducer = reducer_for(case, r=schedule, alpha=1.0, trace_source=True)
    state = reducer.start(num_blocks=len(schedule))
    x = case.x
    for _ in schedule:
        x = reducer.step(x, x, state, torch.rand(x.shape[:2]).softmax(-1))
    source = state.source
    if source is None:  # nothing merged
        assert x.shape[1] == case.tokens
        return
    # every original token sits in exactly one output slot, and slot sizes agree
    assert source.shape == (case.batch, case.tokens)
    assert int(source.min()) >= 0 and int(source.max()) < x.shape[1]
    counts = torch.zeros(case.batch, x.shape[1]).scatter_add(1, source, torch.ones(source.shape))
    assert torch.equal(counts[..., None], state.sizes_for(x))
    # protected tokens stand only for themselves
    p = case.protected
    assert source[:, :p].tolist() == [list(range(p))] * case.batch


@given(cases())
def test_restore_inverts_merge_on_unmerged_tokens(case):
    reducer = reducer_for(case, r=case.r, alpha=1.0)
    plan = reducer.plan(case.metric, case.semantic, case.r)
    restored = reducer.restore(reducer.merge(case.x, plan), plan)
    assert restored.shape == case.x.shape and restored.dtype == case.x.dtype
    alone = plan.slot_sizes().gather(1, plan.assignment()) == 1  # (B, N)
    assert torch.equal(restored[alone], case.x[alone])


@given(cases())
def test_restore_is_exact_when_merged_tokens_are_identical(case):
    reducer = reducer_for(case, r=case.r, alpha=1.0)
    plan = reducer.plan(case.metric, case.semantic, case.r)
    # make every token equal to the token seeding its slot: merges then change nothing
    seed_token = plan.kept_idx.gather(1, plan.assignment())
    x = case.x.gather(1, seed_token[..., None].expand_as(case.x))
    restored = reducer.restore(reducer.merge(x, plan), plan)
    assert torch.equal(restored, x)


@given(cases(dtypes=[torch.float32]), modes)
def test_batch_elements_are_independent(case, mode):
    reducer = reducer_for(case, r=case.r, alpha=4.0, mode=mode, trace_source=True)
    state = reducer.start(num_blocks=1)
    batched = reducer.step(case.x, case.metric, state, case.semantic)
    for b in range(case.batch):
        single_state = reducer.start(num_blocks=1)
        single = reducer.step(
            case.x[b : b + 1], case.metric[b : b + 1], single_state, case.semantic[b : b + 1]
        )
        torch.testing.assert_close(batched[b : b + 1], single, rtol=0, atol=1e-6)
        if single_state.source is not None:
            assert torch.equal(state.source[b : b + 1], single_state.source)


@given(cases(), modes)
def test_dtype_and_device_are_kept(case, mode):
    reducer = reducer_for(case, r=case.r, alpha=1.0, mode=mode)
    state = reducer.start(num_blocks=1)
    out = reducer.step(case.x, case.metric, state, case.semantic)
    assert out.dtype == case.x.dtype and out.device == case.x.device
    assert torch.isfinite(out.float()).all()


def test_broken_size_update_is_caught():
    """The size invariant detects a merger that forgets to add sizes."""

    class ForgetfulMerger:
        def merge(self, x, plan, size=None):
            out, _ = TokenReducer().merger.merge(x, plan, size)
            return out, torch.ones(out.shape[0], out.shape[1], 1)

    case = make_case(0, 2, 20, 8, 5, 1)
    reducer = TokenReducer(TurboConfig(r=5, alpha=0.0), merger=ForgetfulMerger())
    state = reducer.start(1)
    out = reducer.step(case.x, case.metric, state)
    assert state.sizes_for(out).sum() != case.batch * case.tokens


@st.composite
def padded_cases(draw):
    case = draw(cases(dtypes=[torch.float32], max_tokens=30))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(case.batch, case.tokens, generator=g) < draw(st.floats(0.2, 0.9))
    mask[:, : max(case.protected, 1)] = True  # protected tokens (and the first) are real
    return case, mask


@given(padded_cases(), st.lists(st.integers(0, 8), min_size=1, max_size=3))
def test_padding_never_contaminates_real_tokens(case_and_mask, schedule):
    case, mask = case_and_mask
    reducer = reducer_for(case, r=schedule, alpha=1.0, trace_source=True)

    def run(x, metric):
        state = reducer.start(num_blocks=len(schedule), token_mask=mask)
        for _ in schedule:
            x = reducer.step(x, metric, state, torch.ones(x.shape[:2]).softmax(-1))
            metric = x
        return x, state

    out, state = run(case.x, case.metric)
    # sizes count real tokens only; padding has size 0
    assert torch.equal(state.size.sum(dim=(1, 2)), mask.sum(dim=1).float())
    # changing what the padding holds changes nothing that real tokens see
    # Other padding content (seeded: the property must not depend on the global RNG).
    # When a sequence runs out of real candidates, a real token may land in a padding slot:
    # exact in value, up to float rounding on the order of the padding's magnitude.
    pad = ~mask[..., None]
    g = torch.Generator().manual_seed(1234)
    other, other_state = run(
        torch.where(pad, torch.randn(case.x.shape, generator=g), case.x),
        torch.where(pad, torch.randn(case.metric.shape, generator=g), case.metric),
    )
    real_slots = state.size[..., 0] > 0
    if state.source is not None:
        for b in range(case.batch):
            real_tokens = mask[b].nonzero().flatten()
            mine = out[b, state.source[b, real_tokens]]
            theirs = other[b, other_state.source[b, real_tokens]]
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out[real_slots], other[real_slots], rtol=1e-5, atol=1e-5)
    # attention bias masks padding exactly
    bias = reducer.attention_bias(state, torch.float32)
    if bias is not None:
        assert torch.equal(bias[:, 0, 0] == -torch.inf, ~real_slots)


def test_padding_ranks_after_real_tokens():
    # one sequence: CLS, 6 real tokens, 6 padding; r=3 must merge only real tokens
    mask = torch.tensor([[True] * 7 + [False] * 6])
    x = torch.randn(1, 13, 4)
    reducer = TokenReducer(TurboConfig(r=3, alpha=0.0, protected=1))
    plan = reducer.plan(x, None, 3, token_mask=mask)
    assert all(mask[0, i] for i in plan.merged_idx[0].tolist())
    seeds = plan.kept_idx[0, plan.merged_into[0]]
    assert all(mask[0, i] for i in seeds.tolist())


@pytest.mark.parametrize("trace_source", [False, True])
def test_an_empty_batch_goes_through_every_step(trace_source):
    """Batch size 0 gives empty outputs of the merged shapes, as an unpatched model does."""
    reducer = TokenReducer(TurboConfig(r=3, alpha=1.0, protected=1, trace_source=trace_source))
    state = reducer.start(num_blocks=2)
    x, query = torch.randn(0, 12, 8), torch.randn(0, 2, 4)
    for tokens in (12, 9):
        keys = torch.randn(0, 2, tokens, 4)
        semantic = guide_attention(query, keys, size=state.size)
        assert semantic.shape == (0, tokens)
        plan = reducer.plan(x, semantic, 3)
        assert reducer.restore(reducer.merge(x, plan), plan).shape == (0, tokens, 8)
        x = reducer.step(x, x, state, semantic)
        bias = reducer.attention_bias(state, torch.float32)
        assert bias is not None and bias.shape == (0, 1, 1, tokens - 3)
    assert x.shape == (0, 6, 8)
    assert state.token_counts == [9, 6]
    assert state.sizes_for(x).shape == (0, 6, 1)
