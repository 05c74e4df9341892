"""Turbo vs tomesd on full-size Stable Diffusion UNets (random weights, real configs).

One denoising step (one UNet call) at batch 2 (a classifier-free-guidance pair:
unconditional then conditional text), timed interleaved in one process; every
method patches, runs and unpatches inside its timed call (patching costs well under
a millisecond next to a UNet call). For each setting it prints:

- FLOPs ratio (unpatched / patched), counted on the meta device with fused attention
  by formula (``turbo_eval.measure.count_flops``);
- speedup (median over rounds of t_unpatched / t_method);
- fidelity: mean absolute difference of the UNet output to the unpatched output, over
  seeds (latents with spatial structure, random text embeddings), and the same
  relative to the mean absolute output.

Usage::

    PYTHONPATH=packages/turbo-core/src:packages/turbo-adapters/src:packages/turbo-eval/src \\
        python benchmarks/stable_diffusion.py --model sd15 --repeats 3 --seeds 2 \\
        --json sd15.json --plot sd15_pareto.png

``--model tiny`` runs the same on a tiny UNet in seconds (a smoke test of the script).
``--mode target`` runs only the ``sd-fast`` preset beside tomesd 0.5 and Turbo at
tomesd's settings, and says whether the preset meets the issue's target.
SDXL at 1024 px takes about a minute per call on two CPU cores: use ``--repeats 2``.
``--device cuda --dtype bfloat16`` runs the same on a GPU (CPU and float32 by default).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from benchmark_target import Target, add_target_arguments, target

import turbo_adapters
from turbo_eval.diffusion import (
    sd15_unet_config,
    sdxl_unet_config,
    structured_latents,
    tiny_unet_config,
)
from turbo_eval.measure import count_flops, interleaved_throughput

# (name, family, kwargs). tomesd kwargs are tomesd.apply_patch's; Turbo's are
# turbo_adapters.apply's. "redundancy" is Turbo with alpha=0 (no semantic term).
Setting = tuple[str, str, dict[str, Any]]


#: settings compared for fidelity only (their FLOPs equal another setting's)
FIDELITY_ONLY = ("turbo 0.5 per-half maps", "turbo 0.5 mean-text")


#: tomesd's default components and ratio (queries merged in full-resolution
#: self-attention at 0.5) as Turbo settings; with alpha 0, use_rand False and
#: plan_from "each" (PER_SAMPLE) Turbo computes exactly what tomesd does
AT_TOMESD = {"ratio_attn1": 0.5, "attn1_kv": False, "max_downsample": 1}
#: the same, but every sample of the CFG pair planned on its own, as tomesd does (Turbo's
#: default lets the conditional half's plan serve both halves: half the matching)
PER_SAMPLE = {**AT_TOMESD, "plan_from": "each"}
#: tomesd merging all three components
ALL3 = {"merge_attn": True, "merge_crossattn": True, "merge_mlp": True}


def target_settings(model: str) -> list[Setting]:
    """The issue's target: the ``sd-fast`` preset beside tomesd 0.5 and Turbo at tomesd's
    settings (is the preset at least as close to the unpatched UNet as tomesd 0.5?)."""
    return [
        ("unpatched", "baseline", {}),
        ("tomesd 0.5", "tomesd", {"ratio": 0.5}),
        ("turbo at tomesd 0.5", "turbo", dict(AT_TOMESD)),
        ("redundancy at tomesd 0.5", "redundancy", dict(AT_TOMESD)),
        # tomesd's own computation: every sample of the CFG pair plans on its own
        ("redundancy at tomesd 0.5, per-sample plans", "redundancy", dict(PER_SAMPLE)),
        ("tomesd 0.5 all3", "tomesd", {"ratio": 0.5, **ALL3}),
        ("turbo at tomesd 0.5 all3", "turbo", {**AT_TOMESD, "ratio_attn2": 0.5, "ratio_ff": 0.5}),
        (
            "redundancy at tomesd 0.5 all3",
            "redundancy",
            {**AT_TOMESD, "ratio_attn2": 0.5, "ratio_ff": 0.5},
        ),
        ("turbo sd-fast", "turbo", {"preset": "sd-fast"}),
        ("redundancy sd-fast", "redundancy", {"preset": "sd-fast"}),
    ]


def settings_for(model: str, mode: str = "all") -> list[Setting]:
    """The settings compared on ``model`` (sd15, sdxl or tiny); ``mode="target"``: see
    :func:`target_settings`."""
    if mode == "target":
        return target_settings(model)
    kv = {"attn1_kv": True}
    out: list[Setting] = [("unpatched", "baseline", {})]
    if model == "sdxl":
        return [
            *out,
            ("tomesd 0.5 (default)", "tomesd", {"ratio": 0.5}),
            ("turbo kv.75 md4", "turbo", {"ratio_attn1": 0.75, "max_downsample": 4, **kv}),
            # the SDXL default: kv 0.75, attn2 0.5, ff 0.5, max_downsample 4
            ("turbo default (sdxl)", "turbo", {}),
        ]
    kv16 = {"ratio_attn1": 0.9375, "sx": 4, "sy": 4, **kv}  # one destination per 4x4
    all3 = ALL3
    aggressive = {"ratio_attn1": 0.75, "ratio_attn2": 0.7, "ratio_ff": 0.7, "max_downsample": 2}
    return [
        *out,
        ("tomesd 0.5", "tomesd", {"ratio": 0.5}),
        ("redundancy 0.5", "redundancy", {"ratio_attn1": 0.5}),
        ("turbo 0.5", "turbo", {"ratio_attn1": 0.5}),
        ("tomesd 0.5 all3", "tomesd", {"ratio": 0.5, **all3}),
        ("turbo 0.5 all3", "turbo", {**AT_TOMESD, "ratio_attn2": 0.5, "ratio_ff": 0.5}),
        ("turbo kv.75", "turbo", {"ratio_attn1": 0.75, **kv}),
        (
            "turbo kv.75 a2.5 ff.5 md2",
            "turbo",
            {"ratio_attn1": 0.75, "ratio_attn2": 0.5, "ratio_ff": 0.5, "max_downsample": 2, **kv},
        ),
        ("turbo kv.75 a2.7 ff.7 md2", "turbo", {**aggressive, **kv}),
        ("redundancy kv.75 a2.7 ff.7 md2", "redundancy", {**aggressive, **kv}),
        ("tomesd 0.7 all3 md2", "tomesd", {"ratio": 0.7, "max_downsample": 2, **all3}),
        ("turbo kv.94 4x4 md2", "turbo", {**kv16, "max_downsample": 2}),
        ("turbo kv.94 4x4 a2.5 md2", "turbo", {**kv16, "ratio_attn2": 0.5, "max_downsample": 2}),
        ("turbo 0.5 per-half maps", "turbo", {"ratio_attn1": 0.5, "semantic_from": "each"}),
        ("turbo 0.5 mean-text", "turbo", {"ratio_attn1": 0.5, "text_reduce": "mean"}),
    ]


def build(model: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, int, int]:
    """The UNet (random weights, seed 0), its latent size and its text width."""
    from diffusers import UNet2DConditionModel

    config = {
        "sd15": sd15_unet_config,
        "sdxl": sdxl_unet_config,
        "tiny": tiny_unet_config,
    }[model]()
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config).eval()
    size = {"sd15": 64, "sdxl": 128, "tiny": 32}[model]
    return unet, size, config["cross_attention_dim"]


def inputs(
    model: str, size: int, text_dim: int, seed: int, device: str | torch.device = "cpu"
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional UNet inputs for one CFG pair (tomesd reads ``sample`` positionally)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    latent = structured_latents(1, size, size, seed=seed).expand(2, -1, -1, -1).clone()
    text = torch.randn(2, 77, text_dim, generator=generator)
    kwargs: dict[str, Any] = {}
    if model == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, generator=generator).to(device),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2).to(device),
        }
    timestep = torch.tensor(500)
    return (latent.to(device), timestep, text.to(device)), kwargs


def runner(
    unet: torch.nn.Module, family: str, kwargs: dict[str, Any]
) -> Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor]:
    """A function running one patched call and unpatching afterwards."""

    def run(args: tuple[Any, ...], extra: dict[str, Any]) -> torch.Tensor:
        if family == "baseline":
            return unet(*args, **extra).sample
        if family == "tomesd":
            import tomesd

            tomesd.apply_patch(unet, **kwargs)
            try:
                return unet(*args, **extra).sample
            finally:
                tomesd.remove_patch(unet)
        alpha = {} if family == "turbo" else {"alpha": 0.0}
        settings = dict(kwargs)
        preset = settings.pop("preset", None)
        patch = turbo_adapters.apply(unet, preset, cfg_halves=True, **alpha, **settings)
        try:
            return unet(*args, **extra).sample
        finally:
            patch.remove()

    return run


def _bind(run: Callable[..., torch.Tensor], call: tuple[Any, ...]) -> Callable[[], torch.Tensor]:
    return lambda: run(*call)


def _keep(
    store: dict[str, torch.Tensor], name: str, fn: Callable[[], torch.Tensor]
) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        store[name] = fn()
        print(f"  {name} done", flush=True)
        return store[name]

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "sdxl", "tiny"), default="sd15")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    parser.add_argument(
        "--mode",
        choices=("all", "target", "merge-step"),
        default="all",
        help="all: every setting; target: the sd-fast preset beside tomesd 0.5 and Turbo at "
        "tomesd's settings, with the issue's target checked; merge-step: the merge machinery "
        "alone, tomesd's against Turbo's (default: all)",
    )
    parser.add_argument(
        "--vs",
        default="tomesd 0.5",
        help="the setting every other is compared with, round by round (default: tomesd 0.5)",
    )
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--plot", help="write a Pareto plot (fidelity vs speedup) here")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--single-pass",
        action="store_true",
        help="the timed calls' outputs give the fidelity (seed 0 only, no separate pass);"
        " for SDXL at 1024 px on a CPU",
    )
    add_target_arguments(parser)
    args = parser.parse_args(argv)
    where = target(args)
    torch.set_grad_enabled(False)
    if args.mode == "merge-step":
        merge_step(max(args.repeats, 5), where)
        return 0
    settings = settings_for(args.model, args.mode)
    if args.only:
        settings = [s for s in settings if s[0] in args.only or s[1] == "baseline"]
    print(
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, model {args.model}"
    )

    flops: dict[str, int] = {}
    if not args.no_flops:
        meta_unet, size, text_dim = build(args.model, "meta")
        meta_in = inputs(args.model, size, text_dim, 0, "meta")
        for name, family, kwargs in settings:
            flops[name] = count_flops(runner(meta_unet, family, kwargs), *meta_in)
        del meta_unet

    unet, size, text_dim = build(args.model, where.device)
    unet = where.to(unet)
    seeds = [where.to(inputs(args.model, size, text_dim, s)) for s in range(args.seeds)]
    fidelity: dict[str, list[float]] = {name: [] for name, _, _ in settings}
    relative: dict[str, list[float]] = {name: [] for name, _, _ in settings}
    start = time.perf_counter()
    print("FLOPs:", {k: f"{v / 1e9:.1f} G" for k, v in flops.items()}, flush=True)
    if args.single_pass:
        outputs: dict[str, torch.Tensor] = {}
        fns = {
            name: _keep(outputs, name, _bind(runner(unet, family, kwargs), seeds[0]))
            for name, family, kwargs in settings
        }
        timing = interleaved_throughput(
            fns,
            items_per_call=2,
            repeats=args.repeats,
            warmup=args.warmup,
            synchronize=where.synchronize,
        )
        reference = outputs["unpatched"]
        for name in outputs:
            diff = (outputs[name] - reference).abs().mean().item()
            fidelity[name].append(diff)
            relative[name].append(diff / reference.abs().mean().item())
    else:
        for seed_inputs in seeds:
            reference = runner(unet, "baseline", {})(*seed_inputs)
            scale = reference.abs().mean().item()
            for name, family, kwargs in settings:
                out = runner(unet, family, kwargs)(*seed_inputs)
                diff = (out - reference).abs().mean().item()
                fidelity[name].append(diff)
                relative[name].append(diff / scale)
                print(f"  {name}: |diff| {diff:.5f} rel {diff / scale:.4f}", flush=True)
        print(f"fidelity pass: {time.perf_counter() - start:.0f} s", flush=True)
        fns = {
            name: _bind(runner(unet, family, kwargs), seeds[0])
            for name, family, kwargs in settings
            if name not in FIDELITY_ONLY
        }
        timing = interleaved_throughput(
            fns,
            items_per_call=2,
            repeats=args.repeats,
            warmup=args.warmup,
            synchronize=where.synchronize,
        )
    rows = []
    base_flops = flops.get("unpatched")
    for name, family, kwargs in settings:
        m = timing["methods"].get(
            name,
            {"speedup": float("nan"), "items_per_s": float("nan"), "median_s": None, "seconds": []},
        )
        row = {
            "setting": name,
            "family": family,
            "kwargs": kwargs,
            "flops": flops.get(name),
            "flops_ratio": (base_flops / flops[name]) if base_flops and flops.get(name) else None,
            "speedup": m["speedup"],
            "images_per_s": m["items_per_s"],
            "median_s": m["median_s"],
            "seconds": m["seconds"],
            "mean_abs_diff": statistics.mean(fidelity[name]),
            "relative_diff": statistics.mean(relative[name]),
        }
        rows.append(row)
    for row in rows:
        peer = peer_of(row["setting"], timing["methods"], args.vs)
        if peer is not None and row["setting"] in timing["methods"]:
            row["vs"] = {"peer": peer, **paired_speed(timing, peer, row["setting"])}
    print(
        f"{'setting':44s} {'FLOPs ratio':>11s} {'speedup':>8s} {'img/s':>7s} {'|diff|':>9s} "
        f"{'rel':>7s}  speed over the peer, per round [95% interval]"
    )
    for row in rows:
        ratio = f"{row['flops_ratio']:.3f}" if row["flops_ratio"] else "-"
        versus = row.get("vs")
        print(
            f"{row['setting']:44s} {ratio:>11s} {row['speedup']:8.3f} {row['images_per_s']:7.3f} "
            f"{row['mean_abs_diff']:9.5f} {row['relative_diff']:7.4f}"
            + (
                f"  {versus['ratio']:.3f}x [{versus['low']:.3f}, {versus['high']:.3f}] "
                f"vs {versus['peer']}"
                if versus
                else ""
            )
        )
    if args.mode == "target":
        print_target(rows)
    if args.json:
        with open(args.json, "w") as f:
            figures = {"model": args.model, "target": str(where), "repeats": args.repeats}
            json.dump({**figures, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot, args.model)
    return 0


def peer_of(name: str, timed: dict[str, Any], default: str) -> str | None:
    """The setting ``name`` is compared with: ``tomesd X`` for ``... at tomesd X[, ...]``
    when that ran, else ``default`` (when it ran and is not ``name`` itself)."""
    if "at tomesd " in name:
        peer = "tomesd " + name.split("at tomesd ", 1)[1].split(",")[0]
        if peer in timed:
            return peer
    return default if default in timed and default != name else None


def paired_speed(timing: dict[str, Any], peer: str, name: str) -> dict[str, float]:
    """How much faster ``name`` ran than ``peer``: the geometric mean over rounds of
    ``t_peer / t_name`` (both timed in the same round) with its paired bootstrap 95 %
    interval (an interval above 1 resolves "faster")."""
    from turbo_eval.stats import paired_difference

    peer_s, own_s = timing["methods"][peer]["seconds"], timing["methods"][name]["seconds"]
    if len(peer_s) < 2:
        ratio = peer_s[0] / own_s[0]
        return {"ratio": ratio, "low": ratio, "high": ratio, "rounds": 1}
    log_ratio = paired_difference([math.log(t) for t in peer_s], [math.log(t) for t in own_s])
    return {
        "ratio": math.exp(log_ratio.mean),
        "low": math.exp(log_ratio.low),
        "high": math.exp(log_ratio.high),
        "rounds": len(peer_s),
    }


def merge_step(repeats: int, where: Target) -> None:
    """Time the merge machinery alone, where tomesd and Turbo differ at equal settings.

    One full-resolution SD-1.5 block's tokens (a CFG pair, 64 x 64 latent grid, 320
    channels), ratio 0.5, 2 x 2 windows with seeded random destinations: tomesd's
    ``bipartite_soft_matching_random2d`` with its merge and unmerge, against the
    turbo_core calls the Stable Diffusion hooks make (window destinations, window
    scores, plan, size-weighted merge, copy restore), with every sample planned on its
    own and with one plan from the conditional half. Interleaved, median per method.
    """
    import tomesd.merge

    from turbo_adapters.families.stable_diffusion.hooks import _both_halves
    from turbo_core import CopyRestorer, SizeWeightedMerger, score_windows, window_destinations

    batch, height, width, channels = 2, 64, 64, 320
    tokens = height * width
    r = int(tokens * 0.5)
    x = where.to(torch.randn(batch, tokens, channels, generator=torch.Generator().manual_seed(0)))
    y = torch.randn(batch, tokens - r, channels, generator=torch.Generator().manual_seed(1))
    y = where.to(y)
    sync = where.synchronize or (lambda: None)
    merger, restorer = SizeWeightedMerger(), CopyRestorer()

    def tomesd_step() -> torch.Tensor:
        generator = torch.Generator(device=where.device).manual_seed(0)
        merge, unmerge = tomesd.merge.bipartite_soft_matching_random2d(
            x, width, height, 2, 2, r, no_rand=False, generator=generator
        )
        merge(x)
        return unmerge(y)

    def turbo_step(one_plan: bool) -> torch.Tensor:
        generator = torch.Generator(device=where.device).manual_seed(0)
        dst = window_destinations(height, width, 2, 2, generator)
        plan = score_windows(x[batch // 2 :] if one_plan else x, dst).plan(r)
        plan = _both_halves(plan) if one_plan else plan
        merger.merge(x, plan)
        return restorer.restore(y, plan)

    fns = {
        "tomesd": tomesd_step,
        "turbo, per-sample plans": lambda: turbo_step(False),
        "turbo, one plan per CFG pair": lambda: turbo_step(True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["tomesd"])
    print(
        f"merge machinery of one block ({batch} x {tokens} x {channels}, r={r}), {repeats} "
        f"rounds, {where}"
    )
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"  {name:30s} {median * 1e3:7.2f} ms  ({base / median:.2f}x tomesd's speed)")


def print_target(rows: list[dict[str, Any]]) -> None:
    """Is ``turbo sd-fast`` at least as close to the unpatched UNet as tomesd 0.5, and how
    much faster (by FLOPs; by time when the run was timed on a quiet machine)?"""
    by_name = {row["setting"]: row for row in rows}
    peer, fast = by_name.get("tomesd 0.5"), by_name.get("turbo sd-fast")
    if peer is None or fast is None:
        return
    closer = fast["relative_diff"] <= peer["relative_diff"]
    print(
        f"target: turbo sd-fast relative difference {fast['relative_diff']:.4f} vs tomesd 0.5 "
        f"{peer['relative_diff']:.4f} ({'as close or closer' if closer else 'NOT as close'}); "
        f"FLOPs ratio {fast['flops_ratio'] or float('nan'):.3f} vs "
        f"{peer['flops_ratio'] or float('nan'):.3f}; speedup {fast['speedup']:.3f} vs "
        f"{peer['speedup']:.3f} (target: >= 1.3x)"
    )


def plot(rows: list[dict[str, Any]], path: str, model: str) -> None:
    """Pareto plot: relative output difference (lower is better) against speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    markers = {"baseline": "k*", "tomesd": "s", "redundancy": "^", "turbo": "o"}
    for family, marker in markers.items():
        points = [r for r in rows if r["family"] == family]
        if not points:
            continue
        ax.plot(
            [r["speedup"] for r in points],
            [r["relative_diff"] for r in points],
            marker,
            linestyle="",
            label=family,
        )
        for r in points:
            ax.annotate(r["setting"], (r["speedup"], r["relative_diff"]), fontsize=6)
    ax.set_xlabel("speedup vs unpatched (one UNet call, batch 2)")
    ax.set_ylabel("mean |output - unpatched| / mean |unpatched|")
    ax.set_title(f"{model}: fidelity against speed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
