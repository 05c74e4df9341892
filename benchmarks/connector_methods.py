"""Selection cost of every connector method, beside the reduced prefill it precedes (CPU).

For each image size N (576 = LLaVA-1.5, 2880 = LLaVA-NeXT's 5 tiles), width D (4096,
LLaVA-7B) and budget K, times ``method(inputs, K)`` on random inputs: features (1, N, D),
keys (1, N, 1024) as CLIP-L's, a guide (1, N) and a 40-token instruction (1, 40, D).
Median of ``--repeats`` runs after one warm-up, methods interleaved within each round.

Beside it, one LLaMA-7B-shaped decoder layer (width 4096, 32 heads, SwiGLU 11008, float32,
fused causal SDPA) is timed on the reduced prompt (K image tokens + ``--text`` tokens) and
multiplied by ``--layers`` (32): a PROJECTED full-depth reduced prefill, and each method's
cost as a share of it. Figures measured on a shared machine are noisy; label them so.

On a loaded machine, ``--threads 1`` gives steadier figures (two threads contend).

Usage: python benchmarks/connector_methods.py [--tokens 576 2880 --budgets 64 128 192]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from turbo_core import CONNECTOR_METHODS, ConnectorInputs


class DecoderLayer(nn.Module):
    """A LLaMA-style pre-norm decoder layer (RMSNorm, causal attention, SwiGLU MLP)."""

    def __init__(self, width: int = 4096, heads: int = 32, hidden: int = 11008) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, d))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[576, 2880])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--text", type=int, default=40 + 35, help="prompt tokens besides the image")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=sorted(CONNECTOR_METHODS))
    parser.add_argument("--no-prefill", action="store_true", help="skip the decoder-layer timing")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch 1")
    print("measured under load from parallel work (a shared 2-core machine)\n")

    prefill: dict[int, float] = {}
    if not args.no_prefill:
        layer = DecoderLayer(args.width).eval()
        with torch.inference_mode():
            for budget in args.budgets:
                x = torch.randn(1, budget + args.text, args.width)
                prefill[budget] = median_time(lambda x=x: layer(x), args.repeats) * args.layers
        del layer
        for budget, seconds in prefill.items():
            print(
                f"reduced prefill, K={budget} + {args.text} text tokens: one layer measured x "
                f"{args.layers} = {seconds * 1e3:.0f} ms (PROJECTED full depth)"
            )
        print()

    header = f"{'method':<10} {'N':>5} {'K':>4} {'median ms':>10}"
    if prefill:
        header += f" {'share of reduced prefill':>26}"
    print(header)
    for count in args.tokens:
        inputs = ConnectorInputs(
            torch.randn(1, count, args.width),
            keys=torch.randn(1, count, 1024),
            guide=torch.rand(1, count).softmax(-1),
            text=torch.randn(1, 40, args.width),
        )
        for budget in args.budgets:
            timings: dict[str, list[float]] = {name: [] for name in args.methods}
            with torch.inference_mode():
                for name in args.methods:
                    CONNECTOR_METHODS[name](inputs, budget)  # warm-up
                for _ in range(args.repeats):
                    for name in args.methods:  # interleaved: load drifts hit all alike
                        start = time.perf_counter()
                        CONNECTOR_METHODS[name](inputs, budget)
                        timings[name].append(time.perf_counter() - start)
            for name in args.methods:
                seconds = statistics.median(timings[name])
                line = f"{name:<10} {count:>5} {budget:>4} {seconds * 1e3:>10.1f}"
                if prefill:
                    line += f" {100 * seconds / prefill[budget]:>25.1f}%"
                print(line, flush=True)


if __name__ == "__main__":
    main()
