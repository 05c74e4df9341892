"""Measuring FLOPs, throughput and peak memory.

FLOPs come from torch's ``FlopCounterMode`` plus a formula for the CPU's fused
attention kernels, which it otherwise counts as zero (4 % of a ViT-B, more at high
resolution). Throughput is timed interleaved: every method runs once per round, so
slow drifts of a shared machine hit all methods alike; ratios are medians of the
per-round ratios against a baseline.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["attention_flops", "count_flops", "interleaved_throughput", "peak_memory"]

aten = torch.ops.aten


def attention_flops(
    query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...]
) -> int:
    """FLOPs of ``softmax(QK^T) V`` counted as its two matmuls (as torch does for eager).

    Shapes are ``(B, H, L, E)`` for the query, ``(B, H, S, E)`` and ``(B, H, S, Ev)``.
    """
    if not len(query_shape) == len(key_shape) == len(value_shape) >= 2:
        raise ValueError(
            "query_shape, key_shape and value_shape must have the same rank (>= 2), got "
            f"{tuple(query_shape)}, {tuple(key_shape)}, {tuple(value_shape)}"
        )
    *batch, length, embed = query_shape
    source = key_shape[-2]
    value_embed = value_shape[-1]
    if key_shape[-1] != embed or value_shape[-2] != source:
        raise ValueError(
            "key_shape must be (..., S, E) and value_shape (..., S, Ev) for query_shape "
            f"(..., L, E), got {tuple(query_shape)}, {tuple(key_shape)}, {tuple(value_shape)}"
        )
    batch_heads = 1
    for size in batch:
        batch_heads *= size
    return (
        2 * batch_heads * length * source * embed + 2 * batch_heads * length * source * value_embed
    )


def _sdpa_formula(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    # FlopCounterMode hands formulas the shapes of tensor arguments, not the tensors
    return attention_flops(tuple(query_shape), tuple(key_shape), tuple(value_shape))


def _sdpa_backward_formula(
    grad_out_shape: Any,
    query_shape: Any,
    key_shape: Any,
    value_shape: Any,
    *args: Any,
    **kwargs: Any,
) -> int:
    # the backward's four matmuls: dV = P^T dO and dP = dO V^T (the value side),
    # dQ = dS K and dK = dS^T Q (the query-key side): twice the forward
    return 2 * _sdpa_formula(query_shape, key_shape, value_shape)


def _cpu_attention_ops() -> dict[Any, Callable[..., int]]:
    # Fused kernels that torch's own registry leaves out (it covers the CUDA ones).
    # The math fallback needs nothing: it decomposes into matmuls that are counted.
    ops: dict[Any, Callable[..., int]] = {}
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
        "_scaled_dot_product_attention_math_for_mps",
    ):
        packet = getattr(aten, name, None)
        if packet is not None:
            ops[packet] = _sdpa_formula
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_fused_attention_overrideable_backward",
    ):
        packet = getattr(aten, name, None)
        if packet is not None:
            ops[packet] = _sdpa_backward_formula
    return ops


def count_flops(fn: Callable[..., Any], *inputs: Any) -> int:
    """Total FLOPs of one call ``fn(*inputs)``, fused CPU attention included.

    Matmul-like ops only, as torch's ``FlopCounterMode`` counts them (2 per
    multiply-add); attention counts its two matmuls, causal or not.
    """
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_ops()) as counter:
        fn(*inputs)
    return int(counter.get_total_flops())


def interleaved_throughput(
    fns: Mapping[str, Callable[[], Any]],
    items_per_call: int,
    repeats: int = 5,
    warmup: int = 1,
    baseline: str | None = None,
    synchronize: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Time every callable once per round, round after round.

    Returns ``{"methods": {name: {"median_s", "items_per_s", "speedup", "seconds"}},
    "baseline", "rounds", "load": {"before", "after", "threads", "other_cores"}}`` (1-minute
    load averages, torch's thread count and other processes' CPU use during the rounds, for
    :mod:`turbo_eval.noise`); ``speedup`` is the median over rounds of
    ``t_baseline / t_method``. Each round starts one method later than the last, so
    no method always runs right after the same neighbour. Pass
    ``synchronize=torch.cuda.synchronize`` for asynchronous devices; grad mode
    (``torch.inference_mode()`` or not) is the caller's.
    """
    if not fns:
        raise ValueError("fns must name at least one callable")
    if repeats < 1 or warmup < 0 or items_per_call < 1:
        raise ValueError("repeats and items_per_call must be >= 1 and warmup >= 0")
    baseline = baseline if baseline is not None else next(iter(fns))
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {sorted(fns)}")
    from .noise import CpuWindow, load_average

    load_before = load_average()  # the noise flag reads it (turbo_eval.noise)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    sync = synchronize if synchronize is not None else (lambda: None)
    names = list(fns)
    window = CpuWindow()
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            seconds[name].append(time.perf_counter() - start)
    methods = {}
    for name, times in seconds.items():
        ratios = [b / t for b, t in zip(seconds[baseline], times, strict=True)]
        median = statistics.median(times)
        methods[name] = {
            "median_s": median,
            "items_per_s": items_per_call / median,
            "speedup": statistics.median(ratios),
            "seconds": times,
        }
    load = {
        "before": load_before,
        "after": load_average(),
        "threads": torch.get_num_threads(),
        "other_cores": window.other_cores(),
    }
    return {"methods": methods, "baseline": baseline, "rounds": repeats, "load": load}


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created during a call that are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def release(_: Any, key: int = key, size: int = size) -> None:
            self.live -= size
            self._seen.discard(key)

        weakref.finalize(storage, release, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views, in-place and out= results share an argument's storage: no new bytes.
        # Without this, a view of a tensor made before the call counted as allocated.
        # lift_fresh is the exception: its argument is the fresh data of torch.tensor(...).
        inputs = (
            set()
            if func is aten.lift_fresh.default
            else {
                t.untyped_storage().data_ptr()
                for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
        )
        for item in pytree.tree_leaves(out):
            if isinstance(item, torch.Tensor) and item.untyped_storage().data_ptr() not in inputs:
                self._track(item)
        return out


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak bytes allocated by ``fn`` beyond what existed before it.

    On CUDA: ``torch.cuda.max_memory_allocated``. On the CPU: the peak of the bytes
    of tensors created during the call and still alive, tracked per storage through
    a dispatch mode: deterministic and independent of the allocator, unlike RSS.
    """
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    mode = _LiveTensorBytes()
    with mode:
        fn()
    return int(mode.peak)
