"""Intra-modal (vision CLS) against cross-modal guidance for BLIP and BLIP-2 ITM, at equal FLOPs.

Random weights (no checkpoints can be fetched here), real model shapes; every image is
scored against every text with the ITM head. Fidelity to the unpatched model (quality
cannot be measured without real weights): Spearman correlation of the ITM match logits
over all pairs, the agreement of the argmax match decision, and the mean absolute
difference of the match probability.

- ``blip``: ``BlipForImageTextRetrieval`` of the ``Salesforce/blip-itm-base-coco`` shape
  (ViT-B/16 at 384 px, BERT-base text encoder). ``intra``: the vision tower alone
  reduces, r per block guided by the CLS row. ``cross-merge`` / ``cross-prune``: the
  tower reduces less (``--vision-r``) and the text's attention at the first
  cross-attention ranks one more reduction (merge, or prune) of the image.
- ``blip2``: ``Blip2ForImageTextRetrieval`` of the ``Salesforce/blip2-itm-vit-g`` shape
  (EVA ViT-g/14, 39 blocks, 257 tokens at 224 px; Q-Former 12 layers, cross-attention
  every second layer, 32 queries; ``--depth`` shrinks the tower to fit a machine).
  ``intra``: r per vision block (CLS-guided). ``cross-<merge|prune>-<mean|max>``: the
  tower's last ``--hold`` blocks do not reduce, and the Q-Former's first cross-attention
  (its queries after reading the ITM text) ranks one more reduction, pooled over the
  queries by mean or max. ``post-redundancy``: the same token counts as the cross
  settings, ranked by key redundancy alone (a control for the ranking).

The cross settings take the smallest extra r whose FLOPs per ITM call do not exceed the
intra setting's (the ranking's own projections counted), at most what one bipartite
step can remove (a ``flops_ratio`` below intra's says the target was out of reach).
FLOPs are counted on one pair (they depend on token counts only), scores on all pairs.
``--init scaled`` replaces the library's random init (near-uniform attention, ITM
scores that barely depend on the image) by variance-preserving weights.

Usage: python benchmarks/blip_guidance.py [blip|blip2] [--images 4 --texts 4]
       [--init library|scaled] [--tiny] [--device cuda --dtype bfloat16]
       blip:  [--r 16 --vision-r 12]      blip2: [--r 5 --hold 1 --depth 39]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
from benchmark_target import add_target_arguments, target
from blip_caption import BLIP_BASE, photos  # a sibling script

import turbo_adapters as ta
from turbo_adapters.families import blip, blip2
from turbo_core import max_removable
from turbo_eval.measure import count_flops


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [t.argsort().argsort().double() for t in (a.flatten(), b.flatten())]
    centred = [r - r.mean() for r in ranks]
    return float((centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm()))


def fidelity(scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far ITM logits ``(pairs, 2)`` are from the unpatched model's."""
    prob, ref_prob = scores.softmax(-1)[:, 1], reference.softmax(-1)[:, 1]
    return {
        "spearman_match_logit": round(
            spearman(scores[:, 1] - scores[:, 0], reference[:, 1] - reference[:, 0]), 4
        ),
        "decision_agreement": float((scores.argmax(-1) == reference.argmax(-1)).float().mean()),
        "mean_abs_prob_diff": float(f"{float((prob - ref_prob).abs().mean()):.3g}"),
    }


def smallest_r(patch: Any, flops: Callable[[], int], target: int, high: int) -> int:
    """The smallest r of the guided site whose FLOPs reach ``target`` (or ``high``, the
    most it can remove: then the setting costs more than the target, see its ratio)."""
    low = 0
    while low < high:
        mid = (low + high) // 2
        patch.configure(site=blip.CROSS_SITE, r=mid)
        if flops() > target:
            low = mid + 1
        else:
            high = mid
    patch.configure(site=blip.CROSS_SITE, r=low)
    return low


def bench_blip(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    r = 16 if args.r is None else args.r
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
    if args.init == "scaled":
        scaled_init(model)
    model = args.where.to(model)
    pixels = args.where.to(photos(args.images, 384))
    texts = torch.randint(1000, 30000, (args.texts, 12), generator=torch.Generator().manual_seed(1))
    texts = args.where.to(texts)
    pixel_pairs = pixels.repeat_interleave(args.texts, dim=0)
    text_pairs = texts.repeat(args.images, 1)

    def itm() -> torch.Tensor:
        return model(input_ids=text_pairs, pixel_values=pixel_pairs).itm_score

    def one_pair() -> torch.Tensor:
        return model(input_ids=text_pairs[:1], pixel_values=pixel_pairs[:1]).itm_score

    report: dict[str, Any] = {"model": "blip", "pairs": len(text_pairs)}
    with torch.inference_mode():
        reference = itm()
        base_flops = count_flops(one_pair)
        settings: dict[str, dict[str, Any]] = {}
        ta.apply(model, "reference-blip-retrieval", r=r, min_tokens=0)
        settings["intra"] = {"flops": count_flops(one_pair), "scores": itm()}
        target = settings["intra"]["flops"]
        for reduce in ("merge", "prune"):
            ta.remove(model)
            patch = ta.apply(model, "reference-blip-retrieval", r=args.vision_r, min_tokens=0)
            site = blip.use_cross_modal_guidance(patch, r=0, reduce=reduce)
            one_pair()
            most = max_removable(site.last_state.token_counts[-1], 1, 0)
            cross_r = smallest_r(patch, lambda: count_flops(one_pair), target, most)
            settings[f"cross-{reduce}"] = {
                "flops": count_flops(one_pair),
                "scores": itm(),
                "cross_r": cross_r,
                "image_tokens": site.last_state.token_counts[-1],
            }
        ta.remove(model)
    report.update(finish(settings, reference, base_flops))
    report["intra_r"], report["vision_r_with_cross"] = r, args.vision_r
    report["init"] = args.init
    return report


def finish(
    settings: dict[str, dict[str, Any]], reference: torch.Tensor, base_flops: int
) -> dict[str, Any]:
    reference = reference.float()  # fidelity in float32, whatever the target's dtype
    for found in settings.values():
        scores = found.pop("scores").float()
        found["flops_ratio"] = round(base_flops / found.pop("flops"), 3)
        found.update(fidelity(scores, reference))
    return settings


@torch.no_grad()
def scaled_init(model: torch.nn.Module, qk_gain: float = 2.0, seed: int = 0) -> None:
    """Variance-preserving random weights: every matrix N(0, gain^2 / fan_in), ``qk_gain``
    for the attention's query/key projections (peaked attention), unit-variance
    embeddings, positions and queries; norms and biases as the library sets them.

    The library's init (std 0.02 everywhere) gives near-uniform attention and ITM
    scores that hardly depend on the image, so rankings and fidelity mean little there.
    """
    generator = torch.Generator().manual_seed(seed)
    tables = ("word_embeddings", "position_embedding", "class_embedding", "query_tokens")
    for name, p in model.named_parameters():
        if any(table in name for table in tables):
            p.copy_(torch.randn(p.shape, generator=generator))
        elif p.dim() >= 2:
            gain = qk_gain if name.endswith(("qkv.weight", "query.weight", "key.weight")) else 1.0
            p.copy_(torch.randn(p.shape, generator=generator) * gain / p[0].numel() ** 0.5)


def blip2_config(depth: int | None, tiny: bool) -> Any:
    """``Salesforce/blip2-itm-vit-g``: the library's default ViT-g/14 and Q-Former configs
    (the released ones), the ITM text input, 32 queries, 256-d ITC projections."""
    import transformers

    vision: dict[str, Any] = {}
    qformer: dict[str, Any] = {"use_qformer_text_input": True}
    if tiny:
        small = {"hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 4}
        vision = {**small, "num_hidden_layers": 2}
        qformer = {**qformer, **small, "num_hidden_layers": 4, "encoder_hidden_size": 96}
    if depth is not None:
        vision["num_hidden_layers"] = depth
    return transformers.Blip2Config(
        vision_config=vision, qformer_config=qformer, num_query_tokens=32,
        image_text_hidden_size=256, image_token_index=None,
    )  # fmt: skip


def bench_blip2(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    r = 5 if args.r is None else args.r
    torch.manual_seed(0)
    config = blip2_config(args.depth, args.tiny)
    model = transformers.Blip2ForImageTextRetrieval(config).eval()
    if args.init == "scaled":
        scaled_init(model)
    model = args.where.to(model)
    depth = config.vision_config.num_hidden_layers
    if not 0 < args.hold <= depth:
        raise SystemExit(f"--hold must be in 1..{depth} (the tower's blocks), got {args.hold}")
    pixels = args.where.to(photos(args.images, config.vision_config.image_size))
    texts = torch.randint(1000, 30000, (args.texts, 12), generator=torch.Generator().manual_seed(1))
    texts = args.where.to(texts)
    pixel_pairs = pixels.repeat_interleave(args.texts, dim=0)
    text_pairs = texts.repeat(args.images, 1)

    def itm(pairs: int | None = None) -> torch.Tensor:
        ids = text_pairs[:pairs]
        return model(
            pixel_values=pixel_pairs[:pairs], input_ids=ids, attention_mask=torch.ones_like(ids),
            use_image_text_matching_head=True,
        ).logits_per_image  # fmt: skip

    def flops() -> int:
        return count_flops(itm, 1)

    held = [r] * (depth - args.hold) + [0] * args.hold
    report: dict[str, Any] = {"model": "blip2", "pairs": len(text_pairs), "vision_depth": depth}
    with torch.inference_mode():
        reference = itm()
        base_flops = flops()
        settings: dict[str, dict[str, Any]] = {}
        patch = ta.apply(model, r=r, min_tokens=0)
        settings["intra"] = {"flops": flops(), "scores": itm()}
        settings["intra"]["image_tokens"] = patch.last_state.token_counts[-1]
        target = settings["intra"]["flops"]
        ta.remove(model)
        variants = [(reduce, pool) for reduce in ("merge", "prune") for pool in ("mean", "max")]
        for reduce, pool in [*variants, ("merge", "redundancy")]:
            patch = ta.apply(model, r=held, min_tokens=0)
            mode = {"mode": "redundancy"} if pool == "redundancy" else {}
            pooling = "mean" if pool == "redundancy" else pool
            site = blip2.use_cross_modal_guidance(patch, r=0, reduce=reduce, pool=pooling, **mode)
            itm(1)
            most = max_removable(site.last_state.token_counts[-1], 1, 0)
            cross_r = smallest_r(patch, flops, target, most)
            name = "post-redundancy" if pool == "redundancy" else f"cross-{reduce}-{pool}"
            settings[name] = {"flops": flops(), "scores": itm(), "cross_r": cross_r}
            settings[name]["image_tokens"] = site.last_state.token_counts[-1]
            ta.remove(model)
    report.update(finish(settings, reference, base_flops))
    report["intra_r"], report["held_blocks"], report["init"] = r, args.hold, args.init
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=["blip", "blip2"], nargs="?", default="blip")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument(
        "--r", type=int, default=None, help="intra-modal r per vision block (16 BLIP, 5 BLIP-2)"
    )
    parser.add_argument("--vision-r", type=int, default=12, help="BLIP: vision r with cross")
    parser.add_argument(
        "--hold", type=int, default=1, help="BLIP-2: last vision blocks that do not reduce"
    )
    parser.add_argument("--depth", type=int, default=None, help="BLIP-2: vision blocks (39)")
    parser.add_argument("--tiny", action="store_true", help="a small smoke-test config")
    parser.add_argument(
        "--init", choices=["library", "scaled"], default="library",
        help="random weights: the library's init, or variance-preserving (see scaled_init)",
    )  # fmt: skip
    add_target_arguments(parser)
    args = parser.parse_args()
    args.where = target(args)
    report = bench_blip(args) if args.model == "blip" else bench_blip2(args)
    report["target"] = str(args.where)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
