"""Intra-modal (vision CLS) against cross-modal (text) guidance for BLIP ITM, at equal FLOPs.

``BlipForImageTextRetrieval`` of the real ``Salesforce/blip-itm-base-coco`` shape (ViT-B/16
at 384 px, BERT-base text encoder), random weights. Every image is scored against every
text with the ITM head. Settings compared, all at (nearly) the same FLOPs per ITM call:

- ``intra``: the vision tower alone reduces, r per block guided by the CLS row;
- ``cross-merge`` / ``cross-prune``: the tower reduces less, and the text's attention at
  the first cross-attention ranks one more reduction (merge, or prune) of the image.

Fidelity to the unpatched model (quality cannot be measured without real weights):
Spearman correlation of the ITM match logits over all pairs, the agreement of the
argmax match decision, and the mean absolute difference of the match probability.

Usage: python benchmarks/blip_guidance.py [--images 4 --texts 4 --r 16 --vision-r 12]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from blip_caption import BLIP_BASE, photos  # a sibling script

import turbo_adapters as ta
from turbo_adapters.families import blip
from turbo_eval.measure import count_flops


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [t.argsort().argsort().double() for t in (a.flatten(), b.flatten())]
    centred = [r - r.mean() for r in ranks]
    return float((centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--r", type=int, default=16, help="intra-modal r per vision block")
    parser.add_argument("--vision-r", type=int, default=12, help="vision r with cross guidance")
    parser.add_argument("--tiny", action="store_true", help="a 2-block smoke-test config")
    args = parser.parse_args()
    import transformers

    torch.manual_seed(0)
    shape = BLIP_BASE
    if args.tiny:
        small = {"num_hidden_layers": 2, "hidden_size": 96, "intermediate_size": 192}
        shape = {
            **BLIP_BASE,
            "vision_config": {**BLIP_BASE["vision_config"], **small},
            "text_config": {**BLIP_BASE["text_config"], **small, "encoder_hidden_size": 96},
        }
    config = transformers.BlipConfig(**shape)
    model = transformers.BlipForImageTextRetrieval(config).eval()
    pixels = photos(args.images, 384)
    texts = torch.randint(1000, 30000, (args.texts, 12), generator=torch.Generator().manual_seed(1))
    pixel_pairs = pixels.repeat_interleave(args.texts, dim=0)
    text_pairs = texts.repeat(args.images, 1)

    def itm() -> torch.Tensor:
        return model(input_ids=text_pairs, pixel_values=pixel_pairs).itm_score

    report: dict[str, Any] = {"pairs": len(text_pairs)}
    with torch.inference_mode():
        reference = itm()
        base_flops = count_flops(itm)
        settings: dict[str, dict[str, Any]] = {}
        patch = ta.apply(model, "reference-blip-retrieval", r=args.r, min_tokens=0)
        settings["intra"] = {"flops": count_flops(itm), "scores": itm()}
        target = settings["intra"]["flops"]
        for reduce in ("merge", "prune"):
            ta.remove(model)
            patch = ta.apply(model, "reference-blip-retrieval", r=args.vision_r, min_tokens=0)
            site = blip.use_cross_modal_guidance(patch, r=0, reduce=reduce)
            low, high = 0, 577
            while low < high:  # the smallest cross r whose FLOPs reach the intra setting's
                mid = (low + high) // 2
                patch.configure(site=blip.CROSS_SITE, r=mid)
                if count_flops(itm) > target:
                    low = mid + 1
                else:
                    high = mid
            patch.configure(site=blip.CROSS_SITE, r=low)
            settings[f"cross-{reduce}"] = {
                "flops": count_flops(itm),
                "scores": itm(),
                "cross_r": low,
                "image_tokens": site.last_state.token_counts[-1],
            }
        ta.remove(model)
    for name, found in settings.items():
        scores = found.pop("scores")
        prob = scores.softmax(-1)[:, 1]
        ref_prob = reference.softmax(-1)[:, 1]
        found.update(
            flops_ratio=round(base_flops / found.pop("flops"), 3),
            spearman_match_logit=round(
                spearman(scores[:, 1] - scores[:, 0], reference[:, 1] - reference[:, 0]), 4
            ),
            decision_agreement=float((scores.argmax(-1) == reference.argmax(-1)).float().mean()),
            mean_abs_prob_diff=round(float((prob - ref_prob).abs().mean()), 5),
        )
        report[name] = found
    report["intra_r"], report["vision_r_with_cross"] = args.r, args.vision_r
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
