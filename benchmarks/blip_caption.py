"""BLIP captioning and BLIP-2 ViT-g vision throughput, patched over unpatched, on this CPU.

Full-size models with random weights (no checkpoints can be fetched here), built from
the real configurations written below:

- ``blip``: ``BlipForConditionalGeneration`` as ``Salesforce/blip-image-captioning-base``
  (ViT-B/16 at 384 px, 577 tokens; BERT-base decoder), batch 8. Captioning = vision
  encoder + greedy ``generate`` of exactly 20 tokens; vision = the vision tower alone.
  Methods: unpatched, Turbo at r = 0 (fused attention alone) and the preset.
- ``blip2``: the BLIP-2 EVA ViT-g/14 vision tower (39 blocks, 1408 wide, 257 tokens at
  224 px), batch 4.

All methods run interleaved in one process (round-robin, a rotating start) and report
the median of per-round speedups; the FLOPs ratio (fused attention counted) sits beside
them, and caption-token agreement with the unpatched model (generated ids position by
position, and teacher-forced argmax on the unpatched caption). The machine is shared:
treat single runs as noisy and compare methods within a run only.

Usage: python benchmarks/blip_caption.py [blip|blip2] [--preset reference-blip-caption]
       [--batch 8] [--repeats 3] [--r 30] [--extra-r 40 44] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch
from benchmark_target import add_target_arguments, target

import turbo_adapters as ta
from turbo_eval.measure import count_flops, interleaved_throughput
from turbo_eval.vl import NAMED_MODELS

#: ``Salesforce/blip-image-captioning-base`` (vision: ViT-B/16, 384 px; text: BERT-base)
#: and ``Salesforce/blip2-opt-2.7b``'s vision tower (EVA ViT-g/14 without its last block):
#: the real configurations turbo-eval builds its random-weight models from.
BLIP_BASE = NAMED_MODELS["Salesforce/blip-image-captioning-base"][1]()
BLIP2_VIT_G = NAMED_MODELS["Salesforce/blip2-opt-2.7b"][1]()["vision_config"]


def photos(batch: int, size: int) -> torch.Tensor:
    """Real photos (packaged image sets) normalised like BLIP's processor; noise if none."""
    try:
        from turbo_eval.assets.images import real_photos

        found = real_photos(max_images=batch, size=size)
    except (ImportError, OSError) as error:  # the benchmark still runs, on noise
        print(f"no packaged photos ({error}); timing on noise images")
        found = []
    if len(found) < batch:
        print(f"{len(found)} packaged photos for a batch of {batch}: timing on noise images")
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    pixels = torch.stack([torch.as_tensor(p.image).permute(2, 0, 1).float() / 255 for p in found])
    mean = torch.tensor([0.481, 0.458, 0.408]).view(1, 3, 1, 1)
    std = torch.tensor([0.269, 0.261, 0.276]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def sharing(model: torch.nn.Module, build: Any) -> torch.nn.Module:
    """A second instance of ``model`` (own modules and config) on the same weight storage."""
    with torch.device("meta"):
        twin = build(copy.deepcopy(model.config))
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval()


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of positions where two id tensors agree."""
    return float((a == b).float().mean())


def bench_blip(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    torch.manual_seed(0)
    base = transformers.BlipForConditionalGeneration(transformers.BlipConfig(**BLIP_BASE)).eval()
    base = args.where.to(base)
    r0 = copy.deepcopy(base)
    turbo = copy.deepcopy(base)
    ta.apply(r0, args.preset, r=0)
    overrides = {} if args.r is None else {"r": args.r}
    patch = ta.apply(turbo, args.preset, **overrides)
    pixels = args.where.to(photos(args.batch, 384))
    models = {"unpatched": base, "turbo r=0": r0, f"turbo {args.preset}": turbo}
    for r in args.extra_r:  # stronger settings, timed in the same rounds
        models[f"turbo {args.preset} r={r}"] = ta.apply(copy.deepcopy(base), args.preset, r=r).model

    def caption(model: torch.nn.Module) -> torch.Tensor:
        return model.generate(pixel_values=pixels, max_new_tokens=20, min_new_tokens=20)

    report: dict[str, Any] = {"batch": args.batch, "preset": str(patch.config)}
    with torch.inference_mode():
        ids = {name: caption(m) for name, m in models.items()}
        report["token_counts"] = patch.last_state.token_counts
        teacher = {
            name: m(pixel_values=pixels, input_ids=ids["unpatched"]).logits.argmax(-1)
            for name, m in models.items()
        }
        report["agreement"] = {
            name: {
                "generated_ids": agreement(ids[name][:, 1:], ids["unpatched"][:, 1:]),
                "teacher_forced": agreement(teacher[name], teacher["unpatched"]),
            }
            for name in models
        }
        # with random weights the decoder may ignore the image: then agreement says little
        report["distinct_unpatched_captions"] = len(
            {tuple(row.tolist()) for row in ids["unpatched"]}
        )
        print(json.dumps({"agreement": report["agreement"]}), flush=True)
        for what, fn in (
            ("vision", lambda m: m.vision_model(pixel_values=pixels)),
            ("captioning", caption),
        ):
            flops = {name: count_flops(fn, m) for name, m in models.items()}
            timing = interleaved_throughput(
                {name: (lambda m=m, fn=fn: fn(m)) for name, m in models.items()},
                items_per_call=args.batch,
                repeats=args.repeats,
                warmup=1,
                baseline="unpatched",
                synchronize=args.where.synchronize,
            )
            report[what] = {
                name: {
                    "images_per_s": round(t["items_per_s"], 3),
                    "speedup": round(t["speedup"], 3),
                    "flops_ratio": round(flops["unpatched"] / flops[name], 3),
                }
                for name, t in timing["methods"].items()
            }
            print(json.dumps({what: report[what]}), flush=True)  # partial results first
    return report


def bench_blip2(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    torch.manual_seed(0)
    config = transformers.Blip2VisionConfig(**BLIP2_VIT_G)
    base = args.where.to(transformers.Blip2VisionModel(config).eval())
    r0, turbo = (sharing(base, lambda c: transformers.Blip2VisionModel(c)) for _ in range(2))
    ta.apply(r0, args.preset, r=0)
    overrides = {} if args.r is None else {"r": args.r}
    patch = ta.apply(turbo, args.preset, **overrides)
    pixels = args.where.to(photos(args.batch, 224))
    models = {"unpatched": base, "turbo r=0": r0, f"turbo {args.preset}": turbo}
    report: dict[str, Any] = {"batch": args.batch, "preset": str(patch.config)}
    with torch.inference_mode():
        cls = {name: m(pixel_values=pixels).pooler_output for name, m in models.items()}
        report["token_counts"] = patch.last_state.token_counts
        report["cls_cosine_to_unpatched"] = {
            name: float(torch.nn.functional.cosine_similarity(c, cls["unpatched"]).float().mean())
            for name, c in cls.items()
        }
        flops = {
            name: count_flops(lambda m=m: m(pixel_values=pixels)) for name, m in models.items()
        }
        timing = interleaved_throughput(
            {name: (lambda m=m: m(pixel_values=pixels)) for name, m in models.items()},
            items_per_call=args.batch,
            repeats=args.repeats,
            warmup=1,
            baseline="unpatched",
            synchronize=args.where.synchronize,
        )
        report["vision"] = {
            name: {
                "images_per_s": round(t["items_per_s"], 3),
                "speedup": round(t["speedup"], 3),
                "flops_ratio": round(flops["unpatched"] / flops[name], 3),
            }
            for name, t in timing["methods"].items()
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=["blip", "blip2"], nargs="?", default="blip")
    parser.add_argument("--preset", default="reference-blip-caption")
    parser.add_argument("--r", type=int, default=None, help="override the preset's r")
    parser.add_argument(
        "--extra-r",
        type=int,
        nargs="*",
        default=[],
        help="further r values of the preset timed beside it (blip only; default none)",
    )
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    add_target_arguments(parser)
    args = parser.parse_args()
    args.where = target(args)
    if args.batch is None:
        args.batch = 8 if args.model == "blip" else 4
    report = bench_blip(args) if args.model == "blip" else bench_blip2(args)
    report["threads"] = torch.get_num_threads()
    report["target"] = str(args.where)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
