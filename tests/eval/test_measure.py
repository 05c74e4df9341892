"""count_flops with inputs and through the backward pass; throughput rounds and sync."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("turbo_eval")

from turbo_eval.measure import count_flops, interleaved_throughput


def _eager_attention(q, k, v):
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


def _two_matmuls(batch, heads, length, source, embed, value_embed):
    """Written out by hand: (L x E)(E x S) then (L x S)(S x Ev), 2 FLOPs a multiply-add."""
    return (
        2 * batch * heads * length * source * embed
        + 2 * batch * heads * length * source * value_embed
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
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    with Names() as mode:
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
