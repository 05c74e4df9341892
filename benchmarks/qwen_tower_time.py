"""Qwen2.5-VL-7B's vision tower alone (random weights, full size): the unpatched tower
against the tower stage (``QwenTowerReduction``) at K tokens kept per image.

Only the tower: ``visual(pixels, grid_thw=...)`` unpatched, and the tower stage's
``reduced_tower`` (what ``turbo_mode="tower"`` runs in its place), on one ``--size`` px
image. Rounds alternate the two (the order swapped every round); the ratio is per round
(unpatched / tower stage), reported as the median with [min, max] over rounds. Timings on
a shared machine are under load: quote the ratios, not the seconds.

``--flops`` also counts both calls' FLOPs once (``turbo_eval.measure.count_flops``: matmuls
and attention, the stage's similarity matmuls included; independent of load); ``--rounds
0`` then times nothing.

Usage: python benchmarks/qwen_tower_time.py [--size 672 --budget 144 --layers 0 1 2 3
    --rounds 3 --threads 2 --flops --json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from turbo_adapters.families.qwen_vl import QwenTowerReduction
from turbo_adapters.families.qwen_vl.tower import reduced_tower


def build_tower() -> Any:
    """Qwen2.5-VL-7B's vision tower (depth 32, width 1280, windows of 112 px)."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    torch.manual_seed(0)
    config = Qwen2_5_VLVisionConfig(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
        patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    )  # fmt: skip
    return Qwen2_5_VisionTransformerPretrainedModel(config).eval()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=672, help="image side in px (multiple of 28)")
    parser.add_argument("--budget", type=int, default=144, help="tokens kept per image (>= 1)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (>= 1; 0 with --flops)")
    parser.add_argument("--flops", action="store_true", help="count both calls' FLOPs once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (>= 1)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.size < 28 or args.size % 28:
        parser.error(f"--size must be a multiple of 28 (>= 28), got {args.size}")
    for name in ("budget", "rounds", "threads"):
        least = 0 if name == "rounds" and args.flops else 1
        if getattr(args, name) < least:
            parser.error(f"--{name} must be >= {least}, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    visual = build_tower()
    side = args.size // 14
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(side * side, 3 * 2 * 14 * 14, generator=g)
    grid = torch.tensor([[1, side, side]])
    settings = QwenTowerReduction(budget=args.budget, layers=tuple(args.layers))

    def unpatched() -> torch.Tensor:
        return visual(pixels, grid_thw=grid).pooler_output

    def stage() -> torch.Tensor:
        return reduced_tower(visual, pixels, grid, settings, args.budget)[0].tokens

    result: dict[str, Any] = {"args": vars(args)}
    with torch.inference_mode():
        if args.flops:
            from turbo_eval.measure import count_flops

            flops = {"unpatched": count_flops(unpatched), "tower": count_flops(stage)}
            result["gflops"] = {k: v / 1e9 for k, v in flops.items()}
            result["flops_ratio"] = flops["unpatched"] / flops["tower"]
            print(
                f"GFLOPs: unpatched {flops['unpatched'] / 1e9:.1f}, tower stage "
                f"{flops['tower'] / 1e9:.1f} ({result['flops_ratio']:.2f}x fewer)",
                flush=True,
            )
        result["tokens_in"] = side * side // 4
        times: dict[str, list[float]] = {"unpatched": [], "tower": []}
        if args.rounds:  # warm-up
            unpatched()
            result["tokens_out"] = int(stage().shape[0])
        for r in range(args.rounds):
            order = [("unpatched", unpatched), ("tower", stage)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                print(f"  round {r} {name}: {times[name][-1]:.2f} s", flush=True)
    result["seconds"] = times
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.rounds:
        ratios = [u / t for u, t in zip(times["unpatched"], times["tower"], strict=True)]
        result.update(
            ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios)
        )
        print(
            f"Qwen2.5-VL-7B tower at {args.size} px, {result['tokens_in']} -> "
            f"{result['tokens_out']} tokens, merges after blocks {args.layers}, "
            f"{args.threads} threads, under load: tower time unpatched / tower stage "
            f"{result['ratio_median']:.2f}x [{result['ratio_min']:.2f}, "
            f"{result['ratio_max']:.2f}] over {args.rounds} rounds; peak RSS "
            f"{result['peak_rss_mib']:.0f} MiB"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
