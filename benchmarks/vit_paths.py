"""ViT-B/16 through both attention doors: timm (q/k/v layout) and transformers (registry).

Random weights, the same ViT-B/16 shapes; each model patched at the same r against its own
unpatched self, timed interleaved in one process (median of per-round ratios), FLOPs by
``FlopCounterMode`` with fused CPU attention counted. The two speedups should agree: the
transformers model reaches Turbo through its attention registry, timm through a layout.

Usage: python benchmarks/vit_paths.py [--batch 32 --r 13 --resolution 224 --repeats 5]
                                     [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
import transformers
from benchmark_target import add_target_arguments, target

import turbo_adapters
from turbo_eval.measure import count_flops, interleaved_throughput


def models(resolution: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    timm_vit = timm.create_model("vit_base_patch16_224", img_size=resolution).eval()
    config = transformers.ViTConfig(image_size=resolution)  # ViT-B/16 defaults
    hf_vit = transformers.ViTModel(config, add_pooling_layer=False).eval()
    return {"timm": timm_vit, "transformers": hf_vit}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    add_target_arguments(parser)
    args = parser.parse_args()
    where = target(args)
    x = where.to(torch.randn(args.batch, 3, args.resolution, args.resolution))
    print(f"ViT-B/16 {args.resolution}px batch {args.batch} r={args.r} alpha=5 x30, "
          f"{where}, threads={torch.get_num_threads()} torch={torch.__version__}")  # fmt: skip
    for name, model in models(args.resolution).items():
        model = where.to(model)
        patched = copy.deepcopy(model)  # same weights; patched in place, the original stays
        patch = turbo_adapters.apply(patched, "reference", r=args.r, min_tokens=0)
        with torch.inference_mode():
            flops = count_flops(model, x)
            merged_flops = count_flops(patched, x)
            counts = patch.last_state.token_counts
            timed = interleaved_throughput(
                {"unpatched": lambda m=model: m(x), "turbo": lambda m=patched: m(x)},
                items_per_call=args.batch, repeats=args.repeats, baseline="unpatched",
                synchronize=where.synchronize,
            )  # fmt: skip
        seconds = timed["methods"]
        rounds = zip(seconds["unpatched"]["seconds"], seconds["turbo"]["seconds"], strict=True)
        print(
            f"{name:12s} {flops / args.batch / 1e9:6.2f} -> {merged_flops / args.batch / 1e9:6.2f} "
            f"GFLOPs/image (FLOPs ratio {flops / merged_flops:.2f}), tokens {counts[0]} .. "
            f"{counts[-1]}, speedup {seconds['turbo']['speedup']:.2f}x "
            f"(per round: {', '.join(f'{b / t:.2f}' for b, t in rounds)})"
        )


if __name__ == "__main__":
    main()
