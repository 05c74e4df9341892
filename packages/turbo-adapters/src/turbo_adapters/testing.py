"""The conformance kit: what every adapter must satisfy. An adapter joins with one `Case`.

Public, so that a third-party adapter registered through the ``turbo_adapters.adapters``
entry point runs the same checks as the built-in ones (pytest is needed to run it)::

    from turbo_adapters.testing import Case, parametrize, run_check

    CASES = [Case(id="my-vit", build=..., inputs=..., ...)]

    @parametrize(CASES)
    def test_conformance(case, check):
        run_check(case, check)

Oracles, none of which shares code with the library's merging:
- the unpatched model (r = 0, after ``remove``, under accelerate hooks, pruned, int8);
- arithmetic on the schedule for token counts (a loop written here);
- for one block, an eager float64 recomputation: the unpatched block's own
  attention residual (captured with a hook), q/k written per family in the case,
  the loop-based plan and merge of :mod:`turbo_core.testing`, then the block's MLP
  (a step the self-attention oracle does not describe, one ranked by a
  cross-attention, brings its own float64 oracle as ``Case.oracle``).

Device and dtype: CPU and float32 unless ``run_check`` is given others or the
environment sets ``TURBO_KIT_DEVICE`` / ``TURBO_KIT_DTYPE`` (``cuda``, ``bfloat16``); the
model and the floating inputs are moved there, tolerances widen with the dtype's
precision, and the float64 oracle check runs in float64 on that device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from turbo_core import Target
from turbo_core import testing as oracle

from . import api as ta
from .blocks import BlockSpec, TurboBypassWarning
from .patch import handle_of

__all__ = [
    "CHECKS",
    "Case",
    "KitOps",
    "KitTarget",
    "expected_counts",
    "kit_target",
    "oracle",
    "parametrize",
    "run_check",
]


@dataclasses.dataclass(frozen=True)
class KitTarget:
    """Where the kit runs a case: a device and the floating dtype of model and inputs."""

    device: torch.device
    dtype: torch.dtype

    def tolerance(self, base: float) -> float:
        """A float32 tolerance widened by the square root of the dtype's coarser epsilon."""
        ratio = torch.finfo(self.dtype).eps / torch.finfo(torch.float32).eps
        return base * max(1.0, ratio) ** 0.5


def kit_target(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> KitTarget:
    """The target from the arguments, else ``TURBO_KIT_DEVICE`` / ``TURBO_KIT_DTYPE``, else
    CPU and float32."""
    device = device or os.environ.get("TURBO_KIT_DEVICE") or "cpu"
    dtype = dtype or os.environ.get("TURBO_KIT_DTYPE") or "float32"
    if isinstance(dtype, str):
        found = getattr(torch, dtype, None)
        if not isinstance(found, torch.dtype) or not found.is_floating_point:
            raise ValueError(
                f"dtype must name a floating torch dtype (float32, bfloat16 ...), got {dtype!r}"
            )
        dtype = found
    return KitTarget(torch.device(device), dtype)


_TARGET: contextvars.ContextVar[KitTarget | None] = contextvars.ContextVar(
    "turbo_kit_target", default=None
)


def target() -> KitTarget:
    """The target of the check being run."""
    return _TARGET.get() or kit_target()


@contextlib.contextmanager
def _targeting(found: KitTarget) -> Iterator[None]:
    token = _TARGET.set(found)
    try:
        yield
    finally:
        _TARGET.reset(token)


def _moved(value: Any, found: KitTarget) -> Any:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return value.to(found.device, found.dtype)
        return value.to(found.device)
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, found) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, found) for k, v in value.items()}
    return value


def build(case: Case) -> nn.Module:
    """``case.build()`` on the current target."""
    found = target()
    return case.build().to(device=found.device, dtype=found.dtype)


def inputs(case: Case, batch: int) -> tuple[Any, ...]:
    """``case.inputs(batch)`` on the current target (floating tensors in its dtype)."""
    return tuple(_moved(a, target()) for a in case.inputs(batch))


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
    model = build(case)
    args = inputs(case, 2)
    ref = run(case, model, args)
    patch = case.ops.apply(model, 0)
    got = run(case, model, args)
    assert case.ops.counts(patch) == [case.tokens] * len(case.blocks(model))
    tol = target().tolerance(2e-5)
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def check_remove_restores_exactly(case: Case) -> None:
    model = build(case)
    args = inputs(case, 2)
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
    assert handle_of(model) is None


def check_counts_follow_schedule(case: Case) -> None:
    model = build(case)
    depth = len(case.blocks(model))
    patch = case.ops.apply(model, 0)
    args = inputs(case, 2)
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
    model = build(case)
    args = inputs(case, 3)
    patch = case.ops.apply(model, case.r)
    batched = run(case, model, args)
    counts = assert_reduced(case, model, patch)
    for b in range(3):
        single = run(case, model, tuple(a[b : b + 1] for a in args))
        assert case.ops.counts(patch) == counts
        tol = target().tolerance(3e-5)
        torch.testing.assert_close(single[0], batched[b], atol=tol, rtol=tol)


def check_block_matches_float64_oracle(case: Case, alpha: float = 2.0) -> None:
    if case.oracle is not None:
        case.oracle(case, alpha)
        return
    on = target()
    model = case.build().to(device=on.device, dtype=torch.float64)
    args = _moved(case.inputs(2), KitTarget(on.device, torch.float64))
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
    model = build(case)
    args = inputs(case, 2)
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

    model = build(case)
    args = inputs(case, 2)
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
        attach_align_device_hook(model, execution_device=target().device)
    else:
        cpu_offload(model, execution_device=target().device)


def check_accelerate_hooks(case: Case) -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_submodules

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            Counting.calls += 1
            return args, kwargs

    # hooks added before apply (dispatched/offloaded model), then patched
    model = build(case)
    args = inputs(case, 2)
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
    model = build(case)
    patch = case.ops.apply(model, case.r)
    _dispatch(case, model)
    run(case, model, args)
    assert case.ops.counts(patch) == case.ops.expected(case, [case.r] * depth)
    ta.remove(model)
    torch.testing.assert_close(run(case, model, args), ref)


def check_compile(case: Case) -> None:
    model = build(case)
    args = inputs(case, 2)
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
    tol = target().tolerance(1e-5)
    torch.testing.assert_close(got, eager, atol=tol, rtol=tol)


def check_threads(case: Case) -> None:
    models = [build(case), build(case)]
    rs = [1, case.r + 1]
    patches = [case.ops.apply(m, r) for m, r in zip(models, rs, strict=True)]
    args = inputs(case, 2)
    expected = [run(case, m, args) for m in models]
    depth = len(case.blocks(models[0]))
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(4):
            got = run(case, models[i], args)
            counts = case.ops.counts(patches[i])
            if counts != case.ops.expected(case, [rs[i]] * depth):
                errors.append(f"model {i}: counts {counts}")
            if not torch.allclose(got, expected[i], atol=target().tolerance(1e-5)):
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
    args = inputs(case, 2)
    ref = run(case, model, args)
    patch = case.ops.apply(model, 0)
    tolerance = target().tolerance(tolerance)
    torch.testing.assert_close(run(case, model, args), ref, atol=tolerance, rtol=tolerance)
    case.ops.set_r(patch, case.r)
    out = run(case, model, args)
    depth = len(case.blocks(model))
    assert torch.isfinite(out).all()
    assert case.ops.counts(patch) == case.ops.expected(case, [case.r] * depth)


def check_torch_pruning(case: Case) -> None:
    model = build(case)
    case.prune(model, inputs(case, 2))
    _equal_at_r0_then_merges(case, model, 2e-5)


def check_bypass_is_reported(case: Case) -> None:
    """Blocks whose forward another library replaced after apply: a warning, not silence."""
    model = build(case)
    case.ops.apply(model, case.r)
    for block in case.blocks(model):
        block.forward = types.MethodType(type(block).forward, block)  # Turbo's wrapper gone
    with pytest.warns(TurboBypassWarning, match="nothing was merged"):
        run(case, model, inputs(case, 2))


def check_torchao_int8(case: Case) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = build(case)
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


def run_check(
    case: Case,
    name: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> None:
    """Run one check on ``device`` / ``dtype`` (see :func:`kit_target`); one the unpatched
    model itself cannot pass is skipped with its reason."""
    if name not in CHECKS:
        raise ValueError(f"check must be one of {sorted(CHECKS)}, got {name!r}")
    if name in case.cannot:
        pytest.skip(f"{case.id}: {case.cannot[name]}")
    with _targeting(kit_target(device, dtype)):
        CHECKS[name](case)


def parametrize(cases: list[Case]) -> Any:
    """``@parametrize(CASES)`` over every (case, check) pair."""
    pairs = [pytest.param(c, name, id=f"{c.id}-{name}") for c in cases for name in CHECKS]
    return pytest.mark.parametrize(("case", "check"), pairs)
