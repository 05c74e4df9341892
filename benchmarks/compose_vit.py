"""Do Turbo's gains multiply with pruning and int8? timm ViT-B/16 (random weights) on the CPU.

One process, every method timed once per round, round after round (interleaved), so
the drifts of a shared machine hit all alike; speed-ups are medians of per-round
ratios against the dense unpatched model. Methods:

  baseline          dense, unpatched
  turbo             Turbo at r (alpha 5, the reference preset's semantics)
  prune             torch-pruning: 30 % of heads and of MLP channels removed
  turbo+prune
  upop              UPop-style narrowed heads (every head keeps --upop-keep of its
                    channels; MLP keeps --upop-mlp), num_heads and scale unchanged
  turbo+upop
  int8              torchao weight-only int8 on every Linear
  turbo+int8

Printed per method: GFLOPs per image (fused attention counted), images/s, speed-up,
peak activation memory of one batch, weight bytes. Then the check of the paper's
claim that gains multiply: speed-up(turbo + X) against speed-up(turbo) x speed-up(X).

Usage: python benchmarks/compose_vit.py [--batch 32 --r 13 --repeats 3 --json out.json]
                                        [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from typing import Any

import torch
from benchmark_target import add_target_arguments, target
from torch import nn

import turbo_adapters as ta
from turbo_adapters import compose
from turbo_eval.measure import count_flops, interleaved_throughput, peak_memory

METHODS = ("baseline", "turbo", "prune", "turbo+prune", "upop", "turbo+upop", "int8", "turbo+int8")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers; tensor subclasses (int8) counted by their parts."""

    def size(t: torch.Tensor) -> int:
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(size(t) for t in [*model.parameters(), *model.buffers()])


def variants(
    dense: nn.Module, images: torch.Tensor, args: argparse.Namespace
) -> dict[str, nn.Module]:
    """The model-side step of every method on its own copy of the dense model."""
    pruned = copy.deepcopy(dense)
    compose.prune_heads_and_mlp(pruned, images[:2], head_ratio=0.3, mlp_ratio=0.3)
    narrowed = copy.deepcopy(dense)
    compose.narrow_heads(narrowed, args.upop_keep, mlp_keep=args.upop_mlp)
    quantized = compose.quantize_weights(copy.deepcopy(dense), "torchao")
    return {"baseline": dense, "prune": pruned, "upop": narrowed, "int8": quantized}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="vit_base_patch16_224", help="timm name (default %(default)s)"
    )
    parser.add_argument(
        "--batch", type=int, default=32, help="images per call (default %(default)s)"
    )
    parser.add_argument(
        "--r", type=int, default=13, help="tokens merged per block (default %(default)s)"
    )
    parser.add_argument(
        "--flops-batch",
        type=int,
        default=4,
        help="images for the FLOPs count (default %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default %(default)s)")
    parser.add_argument(
        "--upop-keep",
        type=float,
        default=0.625,
        help="head width kept, (0, 1] (default %(default)s)",
    )
    parser.add_argument(
        "--upop-mlp", type=float, default=0.6, help="MLP width kept, (0, 1] (default %(default)s)"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of: " + ", ".join(METHODS),
    )
    parser.add_argument("--json", default=None, help="write the figures here")
    add_target_arguments(parser)
    args = parser.parse_args()
    where = target(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "baseline" not in methods:
        parser.error(f"--methods must include baseline and only {list(METHODS)}; unknown {unknown}")

    import timm

    torch.manual_seed(0)
    dense = where.to(timm.create_model(args.model, pretrained=False).eval())
    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    images = where.to(images)
    models = variants(dense, images, args)
    # each Turbo method gets its own copy of the model it stacks on, patched once
    fns: dict[str, Callable[[], Any]] = {}
    flop_fns: dict[str, Callable[[], Any]] = {}
    for method in methods:
        side = (
            method.split("+")[-1]
            if "+" in method
            else ("baseline" if method == "turbo" else method)
        )
        model = models[side]
        if method.startswith("turbo"):
            model = copy.deepcopy(model)
            ta.apply(model, "reference", r=args.r)
        fns[method] = lambda m=model: m(images)
        flop_fns[method] = lambda m=model: m(images[: args.flops_batch])

    rows: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for method, fn in fns.items():
            print(f"counting FLOPs and peak memory: {method}", flush=True)
            model = fn.__defaults__[0]  # type: ignore[index]
            rows[method] = {
                # per image: every image is merged on its own, so a smaller batch counts the same
                "gflops_per_image": count_flops(flop_fns[method]) / args.flops_batch / 1e9,
                "peak_activation_mb": peak_memory(fn, where.device) / 2**20,
                "weight_mb": weight_bytes(model) / 2**20,
            }
        print(f"timing {len(fns)} methods interleaved, {args.repeats} rounds", flush=True)
        timing = interleaved_throughput(
            fns,
            items_per_call=args.batch,
            repeats=args.repeats,
            warmup=1,
            baseline="baseline",
            synchronize=where.synchronize,
        )
    base_flops = rows["baseline"]["gflops_per_image"]
    print(
        f"{args.model}, batch {args.batch}, r={args.r}, {args.repeats} rounds, {where}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'method':<13}{'GFLOPs/img':>11}{'FLOPs x':>9}{'img/s':>8}{'speed-up':>10}{'peak act MB':>13}{'weights MB':>12}"
    )
    for method, row in rows.items():
        t = timing["methods"][method]
        row.update(items_per_s=t["items_per_s"], speedup=t["speedup"], seconds=t["seconds"])
        row["flops_ratio"] = base_flops / row["gflops_per_image"]
        print(
            f"{method:<13}{row['gflops_per_image']:>11.2f}{row['flops_ratio']:>9.2f}{row['items_per_s']:>8.2f}"
            f"{row['speedup']:>10.2f}{row['peak_activation_mb']:>13.0f}{row['weight_mb']:>12.0f}"
        )
    print(
        "\ndo the gains multiply? speed-up(turbo + X) vs speed-up(turbo) x speed-up(X); FLOPs likewise"
    )
    for side in ("prune", "upop", "int8"):
        both = f"turbo+{side}"
        if both in rows and side in rows and "turbo" in rows:
            s, f = rows, "flops_ratio"
            print(
                f"  {both:<12} speed {s[both]['speedup']:.2f}x vs {s['turbo']['speedup']:.2f} x {s[side]['speedup']:.2f}"
                f" = {s['turbo']['speedup'] * s[side]['speedup']:.2f}x;  FLOPs {s[both][f]:.2f}x vs"
                f" {s['turbo'][f] * s[side][f]:.2f}x"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"args": vars(args), "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
