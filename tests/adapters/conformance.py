"""The conformance kit: what every adapter must satisfy. An adapter joins with one `Case`.

Oracles, none of which shares code with turbo_core or turbo_adapters:
- the unpatched model (r = 0, after ``remove``, under accelerate hooks, pruned, int8);
- arithmetic on the schedule for token counts (a loop written here);
- for one block, an eager float64 recomputation: the unpatched block's own
  attention residual (captured with a hook), q/k written per family in the case,
  the loop-based plan and merge of ``tests/core/oracle.py``, then the block's MLP
  (a step the self-attention oracle does not describe, one ranked by a
  cross-attention, brings its own float64 oracle as ``Case.oracle``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import turbo_adapters as ta
from turbo_adapters import BlockSpec
from turbo_core import Target

_spec = importlib.util.spec_from_file_location(
    "turbo_kit_oracle", Path(__file__).parents[1] / "core" / "oracle.py"
)
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)


class KitOps:
    """How the kit patches a model for its ``r``, changes ``r`` and reads token counts.

    The default is every token-merging adapter's interface: the config's ``r``, and
    ``last_state.token_counts`` (tokens after each block's merge), which follow the
    bipartite rule of :func:`expected_counts`. An adapter with other settings (Stable
    Diffusion merges a ratio per component and restores the full length; cross-modal
    guidance reduces once more on a site of its own) subclasses it.
    """

    def apply(self, model: nn.Module, r: Any, **config: Any) -> Any:
        return ta.apply(model, r=r, **config)

    def set_r(self, patch: Any, r: Any) -> None:
        patch.r = r

    def state(self, patch: Any) -> Any:
        """The reduction state of the last call that the kit's ``r`` drives."""
        return patch.last_state

    def counts(self, patch: Any) -> list[int]:
        return list(self.state(patch).token_counts)

    def expected(self, case: Case, schedule: list[int]) -> list[int]:
        return expected_counts(case.tokens, case.prefix, schedule)

    def source(self, patch: Any) -> torch.Tensor | None:
        """Which original tokens each output token stands for (with ``trace_source``)."""
        return self.state(patch).source


@dataclasses.dataclass
class Case:
    """One adapter's entry in the kit.

    Attributes:
        id: test id.
        build: a tiny seeded model in eval mode (weights large enough that attention
            is peaked and tokens differ).
        inputs: ``inputs(batch)`` -> positional arguments of one call.
        output: ``output(model, args)`` -> the tensor compared between runs.
        tokens: sequence length entering the first block; ``prefix``: protected tokens.
        blocks: the blocks that reduce, in order; ``spec``: their parts' names.
        qk: ``qk(model, block, normed_input)`` -> q, k ``(B, H, N, D)`` and the logit
            scale, written in the test from the attention's own modules.
        prune: prunes heads and MLP channels in place with torch-pruning (None: no rule
            for this layout).
        oracle: ``oracle(case, alpha)`` runs the family's own float64 oracle of its
            first reducing step as ``block_matches_float64_oracle``, for a step the
            kit's self-attention oracle does not describe (``spec`` and ``qk`` are
            then unused and may be None).
    """

    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[Any, ...]]
    output: Callable[[nn.Module, tuple[Any, ...]], torch.Tensor]
    tokens: int
    prefix: int
    blocks: Callable[[nn.Module], list[nn.Module]]
    spec: BlockSpec | None
    qk: Callable[..., tuple[torch.Tensor, torch.Tensor, float]] | None
    r: int = 3
    prune: Callable[[nn.Module, tuple[Any, ...]], None] | None = None
    oracle: Callable[[Case, float], None] | None = None
    #: check name -> why the check cannot run on this model (skipped with the reason)
    cannot: dict[str, str] = dataclasses.field(default_factory=dict)
    #: how the kit's r is set and counts are read (see :class:`KitOps`)
    ops: KitOps = dataclasses.field(default_factory=KitOps)


def expected_counts(tokens: int, protected: int, schedule: list[int]) -> list[int]:
    counts = []
    for r in schedule:
        tokens -= max(min(r, (tokens - protected) // 2), 0)
        counts.append(tokens)
    return counts


def run(case: Case, model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model, args)


def module_dicts(model: nn.Module) -> list[set[str]]:
    return [set(m.__dict__) for m in model.modules()]


def assert_reduced(case: Case, model: nn.Module, patch: Any) -> list[int]:
    """The last call reduced as the kit's ``r`` asks (a check comparing runs must not
    pass because nothing was reduced); returns its counts."""
    counts = case.ops.counts(patch)
    assert counts[-1] < case.tokens
    assert counts == case.ops.expected(case, [case.r] * len(case.blocks(model)))
    return counts


# ------------------------------------------------------------------------- the kit
def check_r0_equals_unpatched(case: Case) -> None:
    model = case.build()
    args = case.inputs(2)
    ref = run(case, model, args)
    patch = case.ops.apply(model, 0)
    got = run(case, model, args)
    assert case.ops.counts(patch) == [case.tokens] * len(case.blocks(model))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def check_remove_restores_exactly(case: Case) -> None:
    model = case.build()
    args = case.inputs(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dicts = module_dicts(model)
    ref = run(case, model, args)
    patch = case.ops.apply(model, case.r)
    merged = run(case, model, args)
    assert_reduced(case, model, patch)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ta.remove(model)
    after = run(case, model, args)
    assert not torch.equal(merged, ref) or merged.shape != ref.shape
    assert torch.equal(after, ref)
    assert module_dicts(model) == dicts  # no attribute of Turbo's left behind
    state = model.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in before)
    assert ta.handle_of(model) is None


def check_counts_follow_schedule(case: Case) -> None:
    model = case.build()
    depth = len(case.blocks(model))
    patch = case.ops.apply(model, 0)
    args = case.inputs(2)
    for r in (case.r, [case.r + 2, 0, 1][:depth], (case.r, -1.0)):
        case.ops.set_r(patch, r)
        run(case, model, args)
        schedule = list(ta.resolve_config(None, r=r).schedule(depth))
        assert case.ops.counts(patch) == expected_counts(case.tokens, case.prefix, schedule)
    # a target count after the last block, reached when one bipartite step per block allows
    target = case.tokens - depth  # one token per block
    case.ops.set_r(patch, Target(target))
    run(case, model, args)
    assert case.ops.counts(patch)[-1] == target
    source_sizes = case.ops.state(patch).size
    assert source_sizes is not None and float(source_sizes[0].sum()) == case.tokens


def check_batch_equals_single(case: Case) -> None:
    model = case.build()
    args = case.inputs(3)
    patch = case.ops.apply(model, case.r)
    batched = run(case, model, args)
    counts = assert_reduced(case, model, patch)
    for b in range(3):
        single = run(case, model, tuple(a[b : b + 1] for a in args))
        assert case.ops.counts(patch) == counts
        torch.testing.assert_close(single[0], batched[b], atol=3e-5, rtol=3e-5)


def check_block_matches_float64_oracle(case: Case, alpha: float = 2.0) -> None:
    if case.oracle is not None:
        case.oracle(case, alpha)
        return
    model = case.build().double()
    args = tuple(a.double() if a.is_floating_point() else a for a in case.inputs(2))
    first = case.blocks(model)[0]
    spec = case.spec
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any = None) -> None:
            value = inputs[0] if output is None else output
            captured[name] = value[0] if isinstance(value, tuple) else value

        return hook

    handles = [first.register_forward_pre_hook(keep("x"))]
    if spec.post_norm:  # BERT: the attention sub-layer's output, residual and norm included
        handles.append(spec.part(first, spec.attn).register_forward_hook(keep("y")))
    else:
        handles.append(spec.part(first, spec.norm2).register_forward_pre_hook(keep("y")))
    run(case, model, args)
    for h in handles:
        h.remove()
    x, y = captured["x"], captured["y"]
    normed = x if spec.post_norm else spec.part(first, spec.norm1)(x)
    q, k, scale = case.qk(model, first, normed)
    cls_row = ((q[:, :, :1] @ k.transpose(-1, -2)) * scale).softmax(-1)[:, :, 0].mean(1)
    weight = alpha * 30.0
    plans = oracle.oracle_plan(k.mean(1), cls_row, case.r, case.prefix, weight=weight)
    merged = torch.stack([oracle.oracle_merge(y[b], None, plans[b])[0] for b in range(2)])
    with torch.no_grad():
        if spec.post_norm:
            expected = spec.part(first, spec.mlp)(merged)
        else:
            h = spec.part(first, spec.mlp)(spec.part(first, spec.norm2)(merged))
            ls2 = spec.part(first, spec.ls2)
            if ls2 is not None:
                h = ls2 * h if isinstance(ls2, torch.Tensor) else ls2(h)
            expected = merged + h

    depth = len(case.blocks(model))
    patch = ta.apply(model, r=[case.r] + [0] * (depth - 1), alpha=alpha, semantic_scale=30.0)
    out = {}
    hook = first.register_forward_hook(lambda m, i, o: out.setdefault("z", o))
    run(case, model, args)
    hook.remove()
    assert patch.last_state.r_applied[0] == case.r
    torch.testing.assert_close(out["z"], expected, atol=1e-9, rtol=1e-9)


def check_alpha0_equals_redundancy(case: Case) -> None:
    model = case.build()
    args = case.inputs(2)
    outputs, sources = [], []
    for overrides in ({"alpha": 0.0}, {"mode": "redundancy", "alpha": 3.0}):
        patch = case.ops.apply(model, case.r, trace_source=True, **overrides)
        try:
            outputs.append(run(case, model, args))
            assert_reduced(case, model, patch)  # decisions were taken
            sources.append(case.ops.source(patch))
        finally:
            patch.remove()
    assert torch.equal(outputs[0], outputs[1])
    if sources[0] is not None or sources[1] is not None:  # an adapter that traces sources
        assert torch.equal(sources[0], sources[1])


def check_roles_survive_settings(case: Case) -> None:
    from turbo_core import InformationScorer

    class Reversed(InformationScorer):  # ranks the other way: a visible, legal change
        def score(self, *args: Any, **kwargs: Any) -> Any:
            scores = super().score(*args, **kwargs)
            degree = torch.where(scores.degree.isinf(), scores.degree, -scores.degree)
            return dataclasses.replace(scores, degree=degree)

    model = case.build()
    args = case.inputs(2)
    patch = case.ops.apply(model, case.r, trace_source=True)
    run(case, model, args)
    plain = case.ops.source(patch)
    patch.configure(scorer=Reversed(patch.config))
    case.ops.set_r(patch, case.r)  # a settings change must keep the user's scorer
    patch.alpha = patch.alpha
    run(case, model, args)
    assert not torch.equal(case.ops.source(patch), plain)


def _dispatch(case: Case, model: nn.Module) -> None:
    """accelerate's offloading hooks, or (where the unpatched model cannot be offloaded)
    its device-alignment hooks on every module that holds parameters."""
    from accelerate import cpu_offload
    from accelerate.hooks import attach_align_device_hook

    if "cpu_offload" in case.cannot:
        attach_align_device_hook(model, execution_device=torch.device("cpu"))
    else:
        cpu_offload(model, execution_device=torch.device("cpu"))


def check_accelerate_hooks(case: Case) -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_submodules

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            Counting.calls += 1
            return args, kwargs

    # hooks added before apply (dispatched/offloaded model), then patched
    model = case.build()
    args = case.inputs(2)
    ref = run(case, model, args)
    _dispatch(case, model)
    for block in case.blocks(model):
        add_hook_to_module(block, Counting(), append=True)
    offloaded = run(case, model, args)
    torch.testing.assert_close(offloaded, ref)
    patch = case.ops.apply(model, case.r)
    calls = Counting.calls
    run(case, model, args)
    depth = len(case.blocks(model))
    assert Counting.calls - calls == depth  # the hooks still run around every block
    assert case.ops.counts(patch) == case.ops.expected(case, [case.r] * depth)
    ta.remove(model)
    torch.testing.assert_close(run(case, model, args), ref)
    remove_hook_from_submodules(model)

    # hooks added after apply
    model = case.build()
    patch = case.ops.apply(model, case.r)
    _dispatch(case, model)
    run(case, model, args)
    assert case.ops.counts(patch) == case.ops.expected(case, [case.r] * depth)
    ta.remove(model)
    torch.testing.assert_close(run(case, model, args), ref)


def check_compile(case: Case) -> None:
    model = case.build()
    args = case.inputs(2)
    patch = case.ops.apply(model, case.r)
    eager = run(case, model, args)
    counts = assert_reduced(case, model, patch)
    torch._dynamo.reset()  # compiled wrappers of other models' patches must not interfere
    try:
        compiled = torch.compile(model, backend="eager")
        got = run(case, compiled, args)
    finally:
        torch._dynamo.reset()
    assert case.ops.counts(patch) == counts
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)


def check_threads(case: Case) -> None:
    models = [case.build(), case.build()]
    rs = [1, case.r + 1]
    patches = [case.ops.apply(m, r) for m, r in zip(models, rs, strict=True)]
    args = case.inputs(2)
    expected = [run(case, m, args) for m in models]
    depth = len(case.blocks(models[0]))
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(4):
            got = run(case, models[i], args)
            counts = case.ops.counts(patches[i])
            if counts != case.ops.expected(case, [rs[i]] * depth):
                errors.append(f"model {i}: counts {counts}")
            if not torch.allclose(got, expected[i], atol=1e-5):
                errors.append(f"model {i}: output differs")

    threads = [threading.Thread(target=work, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _equal_at_r0_then_merges(case: Case, model: nn.Module, tolerance: float) -> None:
    """A model changed outside Turbo (pruned, quantized): r = 0 equals it unpatched, and
    r > 0 runs and follows the schedule."""
    args = case.inputs(2)
    ref = run(case, model, args)
    patch = case.ops.apply(model, 0)
    torch.testing.assert_close(run(case, model, args), ref, atol=tolerance, rtol=tolerance)
    case.ops.set_r(patch, case.r)
    out = run(case, model, args)
    depth = len(case.blocks(model))
    assert torch.isfinite(out).all()
    assert case.ops.counts(patch) == case.ops.expected(case, [case.r] * depth)


def check_torch_pruning(case: Case) -> None:
    model = case.build()
    case.prune(model, case.inputs(2))
    _equal_at_r0_then_merges(case, model, 2e-5)


def check_bypass_is_reported(case: Case) -> None:
    """Blocks whose forward another library replaced after apply: a warning, not silence."""
    model = case.build()
    case.ops.apply(model, case.r)
    for block in case.blocks(model):
        block.forward = types.MethodType(type(block).forward, block)  # Turbo's wrapper gone
    with pytest.warns(ta.TurboBypassWarning, match="nothing was merged"):
        run(case, model, case.inputs(2))


def check_torchao_int8(case: Case) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = case.build()
    quantize_(model, Int8WeightOnlyConfig())
    _equal_at_r0_then_merges(case, model, 1e-4)


CHECKS = {
    "r0_equals_unpatched": check_r0_equals_unpatched,
    "remove_restores_exactly": check_remove_restores_exactly,
    "counts_follow_schedule": check_counts_follow_schedule,
    "batch_equals_single": check_batch_equals_single,
    "block_matches_float64_oracle": check_block_matches_float64_oracle,
    "alpha0_equals_redundancy": check_alpha0_equals_redundancy,
    "roles_survive_settings": check_roles_survive_settings,
    "accelerate_hooks": check_accelerate_hooks,
    "compile": check_compile,
    "threads": check_threads,
    "torch_pruning": check_torch_pruning,
    "torchao_int8": check_torchao_int8,
    "bypass_is_reported": check_bypass_is_reported,
}


def run_check(case: Case, name: str) -> None:
    """Run one check; one the unpatched model itself cannot pass is skipped with its reason."""
    if name in case.cannot and name in CHECKS:
        pytest.skip(f"{case.id}: {case.cannot[name]}")
    CHECKS[name](case)


def parametrize(cases: list[Case]) -> Any:
    """``@parametrize(CASES)`` over every (case, check) pair."""
    pairs = [pytest.param(c, name, id=f"{c.id}-{name}") for c in cases for name in CHECKS]
    return pytest.mark.parametrize(("case", "check"), pairs)
