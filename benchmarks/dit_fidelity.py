"""Fidelity of a short full generation on tiny diffusion-transformer pipelines.

PixArt-Sigma, SD3 and FLUX pipelines built in code (the tiny transformers of
``tests/support/tiny_dit.py``, a tiny VAE, prompt embeddings given: random weights, no
download), 4 steps at 64 x 64 px, the same seed for every setting. Against the unpatched
pipeline's images: relative difference, PSNR (dB) and SSIM (``turbo_eval.generation``).
Speed is not measured here (tiny models time their Python, not their arithmetic): see
``benchmarks/dit.py`` for the full-width speed-ups. Sweeps as in ``benchmarks/dit.py``
(``--methods``, ``--ratios``, ``--todo-factors``); a setting the library refuses is
printed with its reason.

Usage::

    PYTHONPATH=.:packages/turbo-core/src:packages/turbo-adapters/src:packages/turbo-eval/src \\
        python benchmarks/dit_fidelity.py [--steps 4] [--px 64] [--ratios 0.3 0.5 0.7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from dit import METHODS, settings_for  # benchmarks/dit.py, beside this script

import turbo_adapters
from turbo_eval.generation import psnr, ssim


def vae() -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        shift_factor=0.0,
    )


def pipeline(name: str, px: int) -> tuple[Any, dict[str, Any]]:
    import diffusers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny builders
    from support.tiny_dit import TEXT_DIM, tiny_flux, tiny_pixart, tiny_sd3

    g = torch.Generator().manual_seed(5)
    embeds = torch.randn(1, 6, TEXT_DIM, generator=g)
    negative = torch.randn(1, 6, TEXT_DIM, generator=g)
    call: dict[str, Any] = dict(height=px, width=px, output_type="pt")
    none = dict(text_encoder=None, tokenizer=None)
    if name == "pixart":
        pipe = diffusers.PixArtSigmaPipeline(
            transformer=tiny_pixart(sample_size=px // 2),
            vae=vae(),
            scheduler=diffusers.DPMSolverMultistepScheduler(),
            **none,
        )
        mask = torch.ones(1, 6, dtype=torch.long)
        call.update(
            prompt_embeds=embeds,
            prompt_attention_mask=mask,
            negative_prompt=None,
            negative_prompt_embeds=negative,
            negative_prompt_attention_mask=mask,
            use_resolution_binning=False,
        )
    elif name == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=tiny_sd3(sample_size=px // 2),
            vae=vae(),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
            **none,
        )
        call.update(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=torch.randn(1, 8, generator=g),
            negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g),
        )
    else:
        pipe = diffusers.FluxPipeline(
            transformer=tiny_flux(guidance=True),
            vae=vae(),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            text_encoder_2=None,
            tokenizer_2=None,
            **none,
        )
        call.update(prompt_embeds=embeds, pooled_prompt_embeds=torch.randn(1, 8, generator=g))
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def generate(pipe: Any, call: dict[str, Any], steps: int) -> torch.Tensor:
    with torch.no_grad():
        out = pipe(**call, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    return out.images.clamp(0, 1)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["pixart", "sd3", "flux"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    parser.add_argument("--todo-factors", nargs="+", type=int, default=[2])
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'model':<7} {'setting':<21} {'rel diff':>9} {'PSNR dB':>8} {'SSIM':>7}")
    for model in args.models:
        pipe, call = pipeline(model, args.px)
        reference = generate(pipe, call, args.steps)
        settings = settings_for(args.methods, args.ratios, args.todo_factors)[1:]
        for name, method, value, kwargs in settings:
            try:
                patch = turbo_adapters.apply(pipe, use_rand=False, **kwargs)
            except (ValueError, TypeError, NotImplementedError) as error:  # its reason, printed
                print(f"{model:<7} {name:<21} refused: {error}")
                rows.append(dict(model=model, setting=name, method=method, refused=str(error)))
                continue
            try:
                images = generate(pipe, call, args.steps)
            finally:
                patch.remove()
            diff = float((images - reference).norm() / reference.norm())
            row = dict(
                model=model,
                setting=name,
                method=method,
                value=value,
                rel_diff=diff,
                psnr=psnr(images, reference),
                ssim=ssim(images, reference),
            )
            rows.append(row)
            p = row["psnr"]
            print(
                f"{model:<7} {name:<21} {diff:>9.4f} "
                f"{p if math.isfinite(p) else float('inf'):>8.2f} {row['ssim']:>7.4f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
    raise SystemExit(0)
