"""Reducer overhead against one ViT-B block forward, on this machine's CPU.

Times, interleaved in one process (median of repeats, warm-up excluded):
  block:    one pre-norm ViT-B/16 block (d=768, 12 heads, MLP 3072, fused SDPA) at B x N
  reducer:  what Turbo adds per block: the guide (CLS) attention row, the plan, the merge
  path r=0: the same block run by turbo_adapters' block runner and attention path
            (site call, q/k/v layout, SDPA, no merge): the cost of the path itself
  path r:   the same with merging (attention, reduce, MLP on fewer tokens)
and prints each against the plain block. Targets: reducer below 5 %, path r=0 about 0.

Usage: python benchmarks/core_overhead.py [--batch 32 --tokens 197 --width 768 --r 16]
                                         [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from benchmark_target import add_target_arguments, target
from torch import nn

from turbo_core import TokenReducer, TurboConfig, guide_attention


class Attention(nn.Module):
    """Fused-qkv self-attention, as in timm."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.head_dim = width // heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, -1, self.head_dim).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class ViTBlock(nn.Module):
    """A standard pre-norm transformer block, as in timm's ViT-B."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def patched_copy(block: ViTBlock, r: int) -> nn.Module:
    """The block in a one-block model patched through turbo_adapters' public pieces."""
    import copy

    from turbo_adapters import (
        BlockSpec,
        QKVLayout,
        ReductionSite,
        TurboPatch,
        install_blocks,
        install_scope,
    )

    model = nn.Sequential(copy.deepcopy(block))
    spec = BlockSpec(
        norm1="norm1", attn="attn", norm2="norm2", mlp="mlp",
        layout=QKVLayout(fused="qkv", scale=None, out="proj"),
    )  # fmt: skip
    patch = TurboPatch(model, "benchmark")
    config = TurboConfig(r=r, alpha=5.0, semantic_scale=30.0, protected=1)
    site = patch.add_site(ReductionSite("vision", config, 1))
    install_blocks(patch, site, list(model), spec)
    install_scope(patch, site, model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    add_target_arguments(parser)
    args = parser.parse_args()
    where = target(args)
    sync = where.synchronize or (lambda: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    block = where.to(ViTBlock(args.width, args.heads).eval())
    x = where.to(torch.randn(args.batch, args.tokens, args.width))
    reducer = TokenReducer(TurboConfig(r=args.r, alpha=5.0, semantic_scale=30.0))
    with torch.inference_mode():
        q, k, _ = block.attn.qkv_heads(block.norm1(x))
    path_r0, path_r = patched_copy(block, 0), patched_copy(block, args.r)

    def run_reducer() -> None:
        state = reducer.start(num_blocks=1)
        semantic = guide_attention(q[:, :, 0], k)
        reducer.step(x, k.mean(dim=1), state, semantic)

    runs = {
        "block": lambda: block(x),
        "reducer": run_reducer,
        "path r=0": lambda: path_r0(x),
        f"path r={args.r}": lambda: path_r(x),
    }
    timings: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            for fn in runs.values():
                fn()
        for i in range(args.repeats):
            order = list(runs.items())
            order = order[i % len(order) :] + order[: i % len(order)]  # rotate: no fixed slot
            for name, fn in order:
                sync()
                start = time.perf_counter()
                fn()
                sync()
                timings[name].append(time.perf_counter() - start)
    block_s = statistics.median(timings["block"])
    reducer_s = statistics.median(timings["reducer"])
    path0_s = statistics.median(timings["path r=0"])
    path_s = statistics.median(timings[f"path r={args.r}"])
    print(
        f"B={args.batch} N={args.tokens} d={args.width} r={args.r} {where} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(f"block forward   : {block_s * 1e3:8.2f} ms (median of {args.repeats}, this machine)")
    print(f"reducer per block: {reducer_s * 1e3:8.2f} ms (CLS row + plan + merge)")
    print(f"overhead ratio   : {reducer_s / block_s:.2%} of one block (target < 5%)")
    print(
        f"attention path, r=0: {path0_s * 1e3:8.2f} ms = {path0_s / block_s - 1:+.2%} against "
        "the plain block (site call, q/k/v layout, SDPA; nothing merges)"
    )
    print(
        f"attention path, r={args.r}: {path_s * 1e3:8.2f} ms = {block_s / path_s:.2f}x the plain "
        f"block's speed (CLS row, plan, merge; the MLP runs on {args.tokens - args.r} tokens)"
    )


if __name__ == "__main__":
    main()
