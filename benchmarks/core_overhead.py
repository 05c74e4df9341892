"""Reducer overhead against one ViT-B block forward, on this machine's CPU.

Times, interleaved in one process (median of repeats, warm-up excluded):
  block:   one pre-norm ViT-B/16 block (d=768, 12 heads, MLP 3072, fused SDPA) at B x N
  reducer: what Turbo adds per block: the guide (CLS) attention row, the plan, the merge
and prints reducer / block. The issue's target is below 5 %.

Usage: python benchmarks/core_overhead.py [--batch 32 --tokens 197 --width 768 --r 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from turbo_core import TokenReducer, TurboConfig, guide_attention


class ViTBlock(nn.Module):
    """A standard pre-norm transformer block, as in timm's ViT-B."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    block = ViTBlock(args.width, args.heads).eval()
    x = torch.randn(args.batch, args.tokens, args.width)
    reducer = TokenReducer(TurboConfig(r=args.r, alpha=5.0, semantic_scale=30.0))
    with torch.inference_mode():
        q, k, _ = block.qkv_heads(x)

    def run_block() -> None:
        block(x)

    def run_reducer() -> None:
        state = reducer.start(num_blocks=1)
        semantic = guide_attention(q[:, :, 0], k)
        reducer.step(x, k.mean(dim=1), state, semantic)

    timings: dict[str, list[float]] = {"block": [], "reducer": []}
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            run_block()
            run_reducer()
        for _ in range(args.repeats):
            for name, fn in (("block", run_block), ("reducer", run_reducer)):
                start = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - start)
    block_s = statistics.median(timings["block"])
    reducer_s = statistics.median(timings["reducer"])
    print(
        f"B={args.batch} N={args.tokens} d={args.width} r={args.r} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(f"block forward   : {block_s * 1e3:8.2f} ms (median of {args.repeats}, this machine)")
    print(f"reducer per block: {reducer_s * 1e3:8.2f} ms (CLS row + plan + merge)")
    print(f"overhead ratio   : {reducer_s / block_s:.2%} of one block (target < 5%)")


if __name__ == "__main__":
    main()
