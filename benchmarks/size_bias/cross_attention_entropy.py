"""How sharply the text side of a full-size random BLIP attends to the 577 image tokens.

Context for the size-bias measurement (``benchmarks/size_bias/*.toml``): proportional
attention over merged tokens is exact for uniform attention (values are linear in the
merged, size-weighted token), so a gain measured on a model whose cross-attention is
near-uniform would say little. This prints, per cross-attention layer of the unpatched
model (the vl suite's scaled random init, four packaged photos), the entropy over the
image tokens relative to log(577), the effective number of attended tokens exp(H) and
the largest probability, averaged over heads and text tokens.

Usage: python benchmarks/size_bias/cross_attention_entropy.py
       [Salesforce/blip-image-captioning-base | Salesforce/blip-vqa-base | ...]
       [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from turbo_eval.vl import VLSample, load_vl_model
from turbo_eval.vl_data import packaged_captioned_photos

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared options
from benchmark_target import add_target_arguments, target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="Salesforce/blip-image-captioning-base")
    add_target_arguments(parser)
    args = parser.parse_args()
    name, where = args.model, target(args)
    model = load_vl_model(name, None, {"weights": "random"})
    module, photos = where.to(model.module), packaged_captioned_photos(4)
    with torch.inference_mode():
        image = module.vision_model(
            pixel_values=where.to(model.head.pixels([p.image for p in photos]))
        ).last_hidden_state
        if model.family != "blip":
            raise SystemExit(f"{name}: BLIP caption, VQA or ITM models only")
        if hasattr(module, "text_decoder") and not hasattr(module, "text_encoder"):  # captions
            prompt = model.inputs(
                [VLSample(p.image, model.caption_prompt) for p in photos], "caption"
            )
            words = model.tokenizer(
                [p.captions[0] for p in photos], padding=True, return_tensors="pt"
            )
            ids = where.to(torch.cat([prompt["prompt"], words.input_ids[:, 1:]], 1))
            out = module.text_decoder(
                input_ids=ids, encoder_hidden_states=image, output_attentions=True, return_dict=True
            )
        else:  # the VQA question encoder, the ITM text encoder
            text = model.tokenizer(
                [p.captions[0] for p in photos], padding=True, return_tensors="pt"
            )
            out = module.text_encoder(
                input_ids=where.to(text.input_ids), attention_mask=where.to(text.attention_mask),
                encoder_hidden_states=image, output_attentions=True, return_dict=True,
            )  # fmt: skip
    tokens = image.shape[1]
    for layer, weights in enumerate(out.cross_attentions):
        p = weights.float().clamp_min(1e-30)
        entropy = -(p * p.log()).sum(-1)
        print(
            f"layer {layer:2d}: entropy / log(N) {float((entropy / math.log(tokens)).mean()):.3f}"
            f"  exp(H) {float(entropy.exp().mean()):6.1f} of {tokens}"
            f"  max p {float(p.amax(-1).mean()):.3f}"
        )


if __name__ == "__main__":
    main()
