"""turbo_eval.measure: FLOPs (fused attention and its backward included), interleaved throughput
(rotation, synchronisation) and peak memory."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("turbo_eval")

from turbo_eval.measure import attention_flops, count_flops, interleaved_throughput, peak_memory

# (query, key, value) shapes: L != S, Ev != E, no batch dimension, ViT-like sizes
SHAPES = [
    ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4)),
    ((2, 4, 16, 32), (2, 4, 16, 32), (2, 4, 16, 32)),
    ((2, 4, 16, 32), (2, 4, 24, 32), (2, 4, 24, 32)),
    ((2, 4, 16, 32), (2, 4, 24, 32), (2, 4, 24, 16)),
    ((3, 10, 16), (3, 12, 16), (3, 12, 16)),
    ((1, 6, 65, 64), (1, 6, 65, 64), (1, 6, 65, 64)),
]


def _eager_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1) @ v


def _formula(q_shape, k_shape, v_shape):
    """Two batched matmuls: (L x E)(E x S) and (L x S)(S x Ev), 2 FLOPs per multiply-add."""
    batch = 1
    for size in q_shape[:-2]:
        batch *= size
    length, embed, source, value_embed = q_shape[-2], q_shape[-1], k_shape[-2], v_shape[-1]
    return batch * (2 * length * embed * source + 2 * length * source * value_embed)


class _OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "additive-mask"])
@pytest.mark.parametrize(
    "shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1][-2:-1] + s[2][-1:]))
)
def test_sdpa_flops_equal_eager_and_formula(shapes, masked):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=gen) for s in shapes)
    mask = torch.randn(q.shape[-2], k.shape[-2], generator=gen) if masked else None
    fused = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    eager = count_flops(lambda: _eager_attention(q, k, v, mask))
    assert eager == _formula(*shapes)  # torch counts the eager matmuls natively
    assert fused == eager
    assert attention_flops(*shapes) == eager
    # the two computations are the same attention
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask), _eager_attention(q, k, v, mask)
    )


def test_fused_cpu_kernel_is_really_counted():
    # Guards the point of the custom mapping: for these shapes the CPU runs the fused
    # flash kernel, which torch's own counter leaves at zero.
    q = k = v = torch.randn(1, 6, 65, 64)
    recorder = _OpNames()
    with recorder:
        F.scaled_dot_product_attention(q, k, v)
    if not any("flash_attention" in name for name in recorder.names):
        pytest.skip(f"this torch did not pick the fused CPU kernel: {recorder.names}")
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, k, v)
    assert plain.get_total_flops() == 0
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == _formula(
        q.shape, k.shape, v.shape
    )


def test_sdpa_flops_under_no_grad_and_causal():
    q, k, v = (torch.randn(2, 4, 16, 32) for _ in range(3))
    with torch.no_grad():
        fused = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    causal = torch.full((16, 16), float("-inf")).triu(1)
    assert fused == count_flops(lambda: _eager_attention(q, k, v, causal))
    assert fused == _formula(q.shape, k.shape, v.shape)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("batch_shape", "in_f", "out_f"), [((4,), 8, 3), ((2, 5), 16, 12)])
def test_linear_flops(batch_shape, in_f, out_f, bias):
    layer = torch.nn.Linear(in_f, out_f, bias=bias)
    x = torch.randn(*batch_shape, in_f)
    batch = 1
    for size in batch_shape:
        batch *= size
    assert count_flops(lambda: layer(x)) == 2 * in_f * out_f * batch


def test_count_flops_of_nothing_is_zero():
    x = torch.randn(3)
    assert count_flops(lambda: x.view(3, 1)) == 0


@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 5, 8), (2, 7, 6), (2, 7, 4)),  # E differs between query and key
        ((2, 5, 8), (2, 7, 8), (2, 6, 4)),  # S differs between key and value
        ((2, 5, 8), (2, 1, 7, 8), (2, 7, 4)),  # ranks differ
        ((8,), (8,), (8,)),  # no sequence axis
    ],
)
def test_attention_flops_bad_shapes_raise(shapes):
    with pytest.raises(ValueError, match="shape"):
        attention_flops(*shapes)


def _sleeper(seconds: float, calls: list[int]):
    def fn() -> None:
        calls.append(1)
        time.sleep(seconds)

    return fn


def test_interleaved_throughput_structure_and_speedups():
    fast_calls: list[int] = []
    slow_calls: list[int] = []
    result = interleaved_throughput(
        {"base": _sleeper(0.01, fast_calls), "slow": _sleeper(0.02, slow_calls)},
        items_per_call=8,
        repeats=5,
        warmup=2,
    )
    assert result["baseline"] == "base"
    assert result["rounds"] == 5
    assert set(result["methods"]) == {"base", "slow"}
    assert len(fast_calls) == len(slow_calls) == 7  # warmup + repeats
    base, slow = result["methods"]["base"], result["methods"]["slow"]
    for row in (base, slow):
        assert set(row) >= {"median_s", "items_per_s", "speedup", "seconds"}
        assert len(row["seconds"]) == 5
        assert row["items_per_s"] == pytest.approx(8 / row["median_s"])
    assert base["speedup"] == 1.0
    assert 0.01 <= base["median_s"] < 0.1
    # sleep() only promises "at least": generous bounds around the designed 0.5
    assert 0.3 < slow["speedup"] < 0.75
    assert slow["median_s"] > base["median_s"]


def test_interleaved_throughput_named_baseline():
    result = interleaved_throughput(
        {"slow": _sleeper(0.02, []), "fast": _sleeper(0.01, [])},
        items_per_call=1,
        repeats=3,
        warmup=0,
        baseline="slow",
    )
    assert result["baseline"] == "slow"
    assert result["methods"]["slow"]["speedup"] == 1.0
    assert 1.3 < result["methods"]["fast"]["speedup"] < 2.6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fns": {}}, "fns"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"items_per_call": 0}, "items_per_call"),
        ({"baseline": "missing"}, "baseline"),
    ],
)
def test_interleaved_throughput_bad_arguments_raise(kwargs, match):
    args = {"fns": {"a": lambda: None}, "items_per_call": 1, "repeats": 1, "warmup": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        interleaved_throughput(**args)


def test_peak_memory_of_one_tensor_is_its_size():
    assert peak_memory(lambda: torch.empty(1000, dtype=torch.float32)) == 4000
    assert peak_memory(lambda: torch.zeros(10, 100, dtype=torch.float64)) == 8000
    assert peak_memory(lambda: torch.ones(3, dtype=torch.uint8)) == 3


def test_peak_memory_is_the_max_when_freed_and_the_sum_when_alive():
    def sequential() -> torch.Tensor:
        a = torch.ones(1000)  # 4000 bytes
        del a
        return torch.ones(2000)  # 8000 bytes, allocated after the first was freed

    def together() -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.ones(1000)
        b = torch.ones(2000)
        return a, b

    def many_temporaries() -> None:
        for _ in range(10):
            t = torch.ones(500)  # 2000 bytes, replaced (freed) each time
            del t

    assert peak_memory(sequential) == 8000
    assert peak_memory(together) == 12000
    assert peak_memory(many_temporaries) == 2000


def test_peak_memory_ignores_what_existed_before():
    x = torch.ones(1000)
    weight = torch.nn.Linear(100, 30)
    batch = torch.randn(8, 100)
    # views, in-place updates and out= write into storage that existed before the call
    assert peak_memory(lambda: x.view(10, 100)) == 0
    assert peak_memory(lambda: x.view(10, 100)[:5].t()) == 0
    assert peak_memory(lambda: x.add_(1)) == 0
    assert peak_memory(lambda: torch.add(x, 1, out=x)) == 0
    # a new result is counted, a view of a new result is not counted twice
    assert peak_memory(lambda: (x * 2).view(10, 100)) == 4000
    # a Linear forward on existing weights: only its (8, 30) output is new
    with torch.no_grad():
        assert peak_memory(lambda: weight(batch)) == 8 * 30 * 4


def test_peak_memory_counts_python_built_tensors_and_views_of_new_ones():
    assert peak_memory(lambda: torch.tensor([1.0] * 1000)) == 4000

    def viewed() -> torch.Tensor:
        a = torch.ones(1000)
        b = a.view(10, 100)
        c = b[2:4]
        return c

    assert peak_memory(viewed) == 4000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda():
    got = peak_memory(lambda: torch.empty(1 << 20, device="cuda"), device="cuda")
    assert got >= 4 << 20


def _eager_attention_unmasked(q, k, v):
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


def _two_matmuls(batch, heads, length, source, embed, value_embed):
    """:func:`_formula` for (batch, heads) attention of L queries over S keys."""
    return _formula(
        (batch, heads, length, embed),
        (batch, heads, source, embed),
        (batch, heads, source, value_embed),
    )


def test_count_flops_passes_inputs_through():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 4)
    assert count_flops(F.scaled_dot_product_attention, q, k, v) == _two_matmuls(2, 3, 10, 12, 8, 4)
    assert count_flops(_eager_attention, q, k, v) == _two_matmuls(2, 3, 10, 12, 8, 4)


@pytest.mark.parametrize("shape", [(2, 3, 16, 8), (1, 6, 65, 64)])
def test_sdpa_backward_flops_equal_eager_backward(shape):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(*shape, generator=gen) for _ in range(3)]

    def train_step(attention):
        q, k, v = (t.clone().requires_grad_() for t in base)
        attention(q, k, v).sum().backward()

    fused = count_flops(train_step, F.scaled_dot_product_attention)
    eager = count_flops(train_step, _eager_attention)
    batch, heads, length, embed = shape
    forward = _two_matmuls(batch, heads, length, length, embed, embed)
    # eager: 2 forward matmuls + 2 gradient matmuls for each of them
    assert eager == 3 * forward
    assert fused == eager


def test_sdpa_backward_dispatches_to_the_cpu_kernel():
    # guards the test above: without the fused backward op, it would compare eager to eager
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    with _OpNames() as mode:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert any("flash_attention_for_cpu_backward" in n for n in mode.names), mode.names


def test_interleaved_throughput_rotates_the_order_and_synchronizes():
    order: list[str] = []
    syncs: list[int] = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    result = interleaved_throughput(
        fns, items_per_call=4, repeats=3, warmup=1, synchronize=lambda: syncs.append(1)
    )
    warmup_round, *rounds = (order[i : i + 3] for i in range(0, len(order), 3))
    assert warmup_round == ["a", "b", "c"]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert len(syncs) == 2 * 3 * 3  # before and after every timed call
    for row in result["methods"].values():
        assert len(row["seconds"]) == 3 and all(t >= 0 for t in row["seconds"])
