"""Turbo, redundancy-only, ToDo and ToMA on full-width diffusion transformers (random weights).

One denoising step (one transformer call) timed interleaved in one process with SDPA
(the default attention): batch 2 (a classifier-free-guidance pair) for PixArt-Sigma and
SD3-medium, batch 1 for FLUX-dev (guidance embedding, no CFG). For each setting:

- FLOPs ratio (unpatched / patched): torch's FlopCounterMode with fused CPU attention
  counted by formula (``turbo_eval.measure.count_flops``), on the real call;
- speed-up: median over rounds of t_unpatched / t_setting, with the lowest and highest
  round (the interval);
- fidelity: relative difference ``|out - ref| / |ref|`` of the step's output.

Full-size configs (widths, heads, text lengths) with fewer blocks than the real models
(``--blocks``; CPU time): each family's blocks are all alike, so the per-block cost is
what the measured ratios show, and the full-depth time is projected as
``t_measured * depth / blocks`` (labelled "projected"; the embedding and output layers
are counted as if they were blocks, which slightly overstates the full-depth time).

Usage::

    PYTHONPATH=packages/turbo-core/src:packages/turbo-adapters/src:packages/turbo-eval/src \\
        python benchmarks/dit.py --model pixart --px 512 --blocks 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import turbo_adapters
from turbo_eval.measure import count_flops, interleaved_throughput

#: full-size configs (diffusers' config.json of each model), depth given apart
MODELS: dict[str, dict[str, Any]] = {
    "pixart": {  # PixArt-Sigma-XL-2
        "class": "PixArtTransformer2DModel",
        "depth": 28,
        "depth_key": "num_layers",
        "batch": 2,
        "text": 300,
        "config": dict(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=1152,
            caption_channels=4096,
            patch_size=2,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=False,
            interpolation_scale=2,
        ),
    },
    "sd3": {  # stable-diffusion-3-medium
        "class": "SD3Transformer2DModel",
        "depth": 24,
        "depth_key": "num_layers",
        "batch": 2,
        "text": 333,  # 77 CLIP + 256 T5 tokens
        "config": dict(
            patch_size=2,
            in_channels=16,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        ),
    },
    "flux": {  # FLUX.1-dev: 19 double + 38 single blocks at 3072 wide
        "class": "FluxTransformer2DModel",
        "depth": 57,
        "depth_key": None,
        "batch": 1,
        "text": 512,
        "config": dict(
            patch_size=1,
            in_channels=64,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
    },
}

#: (name, turbo_adapters.apply keywords); None is the unpatched model
SETTINGS: list[tuple[str, dict[str, Any] | None]] = [
    ("unpatched", None),
    ("turbo 0.5", {"ratio": 0.5}),
    ("redundancy 0.5", {"ratio": 0.5, "alpha": 0.0, "mode": "redundancy"}),
    ("turbo semantic 0.5", {"ratio": 0.5, "alpha": 0.1}),  # the "dit-semantic" preset
    ("turbo attn-only 0.5", {"ratio_attn1": 0.5, "ratio_ff": 0.0}),
    ("todo x2", {"ratio_attn1": 0.5, "ratio_ff": 0.0, "method": "todo"}),
    ("toma 0.5", {"ratio": 0.5, "method": "toma"}),
]


def build(name: str, blocks: int, px: int) -> torch.nn.Module:
    import diffusers

    spec = MODELS[name]
    config = dict(spec["config"])
    if name == "flux":
        config.update(
            num_layers=max(blocks // 2, 1), num_single_layers=max(blocks - blocks // 2, 1)
        )
    else:
        config[spec["depth_key"]] = blocks
        config["sample_size"] = px // 8
    torch.manual_seed(0)
    model = getattr(diffusers, spec["class"])(**config).eval()
    for p in model.parameters():  # adaLN-zero gates start at 0: give every block an effect
        if p.dim() >= 1 and p.abs().sum() == 0:
            p.data.normal_(0, 0.02)
    return model


def inputs(name: str, px: int, seed: int = 0) -> dict[str, Any]:
    spec = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    batch, text, latent = spec["batch"], spec["text"], px // 8
    coarse = torch.randn(batch, 16, latent // 8, latent // 8, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(latent, latent), mode="bilinear")
    field = field + 0.1 * torch.randn(field.shape, generator=g)
    if name == "pixart":
        return dict(
            hidden_states=field[:, :4],
            encoder_hidden_states=torch.randn(batch, text, 4096, generator=g),
            timestep=torch.full((batch,), 500),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    if name == "sd3":
        return dict(
            hidden_states=field,
            encoder_hidden_states=torch.randn(batch, text, 4096, generator=g),
            pooled_projections=torch.randn(batch, 2048, generator=g),
            timestep=torch.full((batch,), 500),
        )
    # FLUX packs 2x2 latent patches of 16 channels into 64-channel tokens
    grid = latent // 2
    packed = field.reshape(batch, 16, grid, 2, grid, 2).permute(0, 2, 4, 1, 3, 5)
    img_ids = torch.zeros(grid, grid, 3)
    img_ids[..., 1] = torch.arange(grid)[:, None]
    img_ids[..., 2] = torch.arange(grid)[None, :]
    return dict(
        hidden_states=packed.reshape(batch, grid * grid, 64),
        encoder_hidden_states=torch.randn(batch, text, 4096, generator=g),
        pooled_projections=torch.randn(batch, 768, generator=g),
        timestep=torch.full((batch,), 0.5),
        guidance=torch.full((batch,), 3.5),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
    )


def runner(model: torch.nn.Module, x: dict[str, Any]) -> Callable[[], torch.Tensor]:
    """One step of ``model`` (patched once, before any timing, or not at all)."""

    def call() -> torch.Tensor:
        return model(**x).sample

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--px", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="settings to run beside the unpatched model")
    parser.add_argument(
        "--cfg-halves",
        action="store_true",
        help="tell the patch the batch is a CFG pair (one plan and one semantic map for both "
        "halves, as in a pipeline with classifier-free guidance)",
    )
    parser.add_argument("--json", help="write the rows to this JSON file (for dit_pareto.py)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    spec = MODELS[args.model]
    x = inputs(args.model, args.px)
    settings = [
        (n, k)
        for n, k in SETTINGS
        if not (k and k.get("method") == "todo" and args.model != "pixart")  # ToDo: PixArt only
        and (not args.only or n in args.only or k is None)
    ]
    # one model per setting (same seed, same weights), patched once: patching is not timed
    models = {}
    for name, kwargs in settings:
        models[name] = build(args.model, args.blocks, args.px)
        if kwargs is not None:
            pair = (
                {"cfg_halves": True} if args.cfg_halves and kwargs.get("method") != "todo" else {}
            )
            turbo_adapters.apply(models[name], use_rand=False, **kwargs, **pair)
    params = sum(p.numel() for p in models["unpatched"].parameters()) / 1e6
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model} at "
        f"{args.px} px, {args.blocks} of {spec['depth']} blocks ({params:.0f} M parameters), "
        f"batch {spec['batch']}",
        flush=True,
    )
    outputs: dict[str, torch.Tensor] = {}
    flops: dict[str, int] = {}
    for name, _ in settings:
        call = runner(models[name], x)

        def keep(call: Callable[[], torch.Tensor] = call, name: str = name) -> None:
            outputs[name] = call()

        flops[name] = count_flops(keep)
    reference = outputs["unpatched"]
    start = time.perf_counter()
    timing = interleaved_throughput(
        {name: runner(models[name], x) for name, _ in settings},
        items_per_call=spec["batch"],
        repeats=args.repeats,
        warmup=args.warmup,
    )
    base = timing["methods"]["unpatched"]["seconds"]
    print(f"timing: {time.perf_counter() - start:.0f} s, {args.repeats} rounds", flush=True)
    header = (
        f"{'setting':<22} {'FLOPs ratio':>11} {'speed-up':>9} {'interval':>13} "
        f"{'rel diff':>9} {'t/step s':>9} {'full depth s (projected)':>25}"
    )
    print(header)
    rows = []
    for name, _ in settings:
        row = timing["methods"][name]
        ratios = [b / t for b, t in zip(base, row["seconds"], strict=True)]
        diff = float((outputs[name] - reference).norm() / reference.norm())
        projected = row["median_s"] * spec["depth"] / args.blocks
        interval = f"[{min(ratios):.2f}, {max(ratios):.2f}]"
        rows.append(
            dict(
                model=args.model,
                px=args.px,
                blocks=args.blocks,
                setting=name,
                flops_ratio=flops["unpatched"] / flops[name],
                speedup=row["speedup"],
                interval=[min(ratios), max(ratios)],
                rel_diff=diff,
            )
        )
        print(
            f"{name:<22} {flops['unpatched'] / flops[name]:>11.3f} {row['speedup']:>9.3f} "
            f"{interval:>13} {diff:>9.4f} {row['median_s']:>9.2f} {projected:>25.1f}"
        )
    spread = statistics.median(base)
    print(
        f"(unpatched median {spread:.2f} s over {args.repeats} rounds; interval: lowest and "
        "highest round's speed-up; full depth projected from the per-block cost)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
