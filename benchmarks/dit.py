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
(``--blocks``; CPU time). The full depth is projected, per call, from the measured
per-block cost: hooks time every block (outermost, so a block's merge, plan and restore
count as its own) and count its FLOPs; the rest of the call (embeddings, output layer,
the patch's per-call work) is kept once, and each kind of block (FLUX's double and
single blocks, SD3's last block without text output) is scaled to the real model's
count (``DEPTHS``). Projected figures are labelled so.

Sweeps: ``--methods`` picks the methods, ``--ratios`` their merge ratios (Turbo,
redundancy-only, attention-only, ToMA), ``--todo-factors`` ToDo's downsampling (on every
model: PixArt's self-attention, SD3's and FLUX's joint attention). A setting the library
refuses is printed with the library's reason.
All settings share the unpatched model's weights (patching never changes a weight).

Usage::

    PYTHONPATH=packages/turbo-core/src:packages/turbo-adapters/src:packages/turbo-eval/src \\
        python benchmarks/dit.py --model sd3 --px 1024 --blocks 2 --repeats 3 \\
        --methods turbo toma todo --ratios 0.5 0.6 --json sd3_1024.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import turbo_adapters
from turbo_eval.measure import _cpu_attention_ops, interleaved_throughput

#: full-size configs (diffusers' config.json of each model), depth given apart
MODELS: dict[str, dict[str, Any]] = {
    "pixart": {  # PixArt-Sigma-XL-2
        "class": "PixArtTransformer2DModel",
        "depth": 28,
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
        "tiny": dict(num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16),
    },
    "sd3": {  # stable-diffusion-3-medium
        "class": "SD3Transformer2DModel",
        "depth": 24,
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
        "tiny": dict(num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16),
    },
    "flux": {  # FLUX.1-dev: 19 double + 38 single blocks at 3072 wide
        "class": "FluxTransformer2DModel",
        "depth": 57,
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
        "tiny": dict(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6)),
    },
}

#: the real models' block counts by kind of block (what the projection scales to)
DEPTHS: dict[str, dict[str, int]] = {
    "pixart": {"block": 28},
    "sd3": {"joint": 23, "last": 1},  # the last block has no text output (context_pre_only)
    "flux": {"double": 19, "single": 38},
}

#: text tokens of the tiny configs (``--tiny``: the script's smoke test)
TINY_TEXT = 8

#: method -> (setting name with ``{}`` for the value, apply keywords for that value);
#: the value is a merge ratio, or ToDo's downsampling factor
METHODS: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "turbo": ("turbo {}", lambda r: {"ratio": r}),
    "redundancy": ("redundancy {}", lambda r: {"ratio": r, "alpha": 0.0, "mode": "redundancy"}),
    "semantic": ("turbo semantic {}", lambda r: {"ratio": r, "alpha": 0.1}),  # "dit-semantic"
    "attn-only": ("turbo attn-only {}", lambda r: {"ratio_attn1": r, "ratio_ff": 0.0}),
    "todo": (
        "todo x{}",
        lambda f: {"ratio_attn1": 0.5, "ratio_ff": 0.0, "method": "todo", "todo_factor": f},
    ),
    "toma": ("toma {}", lambda r: {"ratio": r, "method": "toma"}),
}


def settings_for(
    methods: list[str], ratios: list[float], todo_factors: list[int]
) -> list[tuple[str, str, Any, dict[str, Any] | None]]:
    """``(name, method, value, apply keywords)`` of every setting, the unpatched model first."""
    settings: list[tuple[str, str, Any, dict[str, Any] | None]] = [
        ("unpatched", "unpatched", 0, None)
    ]
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one of {sorted(METHODS)}")
        label, keywords = METHODS[method]
        for value in todo_factors if method == "todo" else ratios:
            settings.append((label.format(value), method, value, keywords(value)))
    return settings


def layers_for(name: str, blocks: int) -> dict[str, int]:
    """How many blocks of each kind (``DEPTHS``' keys) a ``blocks``-block model has."""
    if blocks < 1:
        raise ValueError(f"blocks must be an int >= 1, got {blocks!r}")
    if name == "flux":  # at least one double and one single block
        return {"double": max(blocks // 2, 1), "single": max(blocks - blocks // 2, 1)}
    if name == "sd3":
        return {"joint": blocks - 1, "last": 1}
    return {"block": blocks}


def build(name: str, px: int, layers: dict[str, int], tiny: bool = False) -> nn.Module:
    """The model with ``layers`` blocks of each kind (``layers_for`` or ``DEPTHS``)."""
    import diffusers

    spec = MODELS[name]
    config = dict(spec["config"], **(spec["tiny"] if tiny else {}))
    if name == "flux":
        config.update(num_layers=layers["double"], num_single_layers=layers["single"])
    else:
        config["num_layers"] = sum(layers.values())
        config["sample_size"] = px // 8
    torch.manual_seed(0)
    model = getattr(diffusers, spec["class"])(**config).eval()
    for p in model.parameters():  # adaLN-zero gates start at 0: give every block an effect
        if p.dim() >= 1 and p.abs().sum() == 0:
            p.data.normal_(0, 0.02)
    return model


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are the very same tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def blocks_by_kind(name: str, model: nn.Module) -> dict[str, list[nn.Module]]:
    """The transformer blocks of ``model``, grouped as in ``DEPTHS[name]``."""
    if name == "flux":
        return {
            "double": list(model.transformer_blocks),
            "single": list(model.single_transformer_blocks),
        }
    blocks = list(model.transformer_blocks)
    if name == "sd3":
        return {"joint": blocks[:-1], "last": blocks[-1:]}
    return {"block": blocks}


def inputs(name: str, px: int, seed: int = 0, tiny: bool = False) -> dict[str, Any]:
    spec = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    batch, latent = spec["batch"], px // 8
    text = TINY_TEXT if tiny else spec["text"]
    coarse = torch.randn(batch, 16, max(latent // 8, 1), max(latent // 8, 1), generator=g)
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


class BlockMeter:
    """Per call of a model: its total, and what its blocks of each kind took.

    A pre-hook put first and a hook put last on every block bracket everything the block
    runs, the patch's hooks included. ``read`` gives the figure to record (wall time,
    or a FLOP counter's running total); ``calls`` holds one ``{kind: amount, "total":
    amount}`` per call of :meth:`measure`.
    """

    def __init__(self, kinds: dict[str, list[nn.Module]], read: Callable[[], float]) -> None:
        self.kinds = kinds
        self.read = read
        self.calls: list[dict[str, float]] = []
        self._start = 0.0
        self._handles = []
        for kind, blocks in kinds.items():
            for block in blocks:
                self._handles.append(block.register_forward_pre_hook(self._enter, prepend=True))
                self._handles.append(
                    block.register_forward_hook(
                        functools.partial(self._exit, kind), always_call=True
                    )
                )

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._start = self.read()

    def _exit(self, kind: str, module: nn.Module, args: Any, output: Any) -> None:
        self.calls[-1][kind] += self.read() - self._start

    def measure(self, call: Callable[[], Any]) -> Any:
        """Run ``call`` once, recording its total and its blocks' share."""
        self.calls.append(dict.fromkeys(self.kinds, 0.0))
        start = self.read()
        out = call()
        self.calls[-1]["total"] = self.read() - start
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def project(call: dict[str, float], measured: dict[str, int], depths: dict[str, int]) -> float:
    """A call's figure at full depth: the rest of the call once, plus every kind of block
    at its mean measured cost times its count in the real model. A kind measured by no
    block takes the mean of all measured blocks."""
    blocks = sum(call[k] for k in measured)
    count = sum(measured.values())
    if count == 0:
        raise ValueError("measured must count at least one block")
    mean_all = blocks / count
    full = call["total"] - blocks
    for kind, depth in depths.items():
        n = measured.get(kind, 0)
        full += depth * (call[kind] / n if n else mean_all)
    return full


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--px", type=int, default=512, help="image side (1024: 4096 tokens)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    parser.add_argument("--todo-factors", nargs="+", type=int, default=[2])
    parser.add_argument("--only", nargs="*", help="settings to run beside the unpatched model")
    parser.add_argument(
        "--cfg-halves",
        action="store_true",
        help="tell the patch the batch is a CFG pair (one plan and one semantic map for both "
        "halves, as in a pipeline with classifier-free guidance)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny widths (smoke test only)")
    parser.add_argument("--json", help="write the rows to this JSON file (for dit_pareto.py)")
    args = parser.parse_args(argv)
    # no autograd for the whole run, and the caller's grad mode back afterwards (the tests
    # call main in-process: a global switch would leak into every later test)
    with torch.no_grad():
        return _run(args)


def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    spec = MODELS[args.model]
    x = inputs(args.model, args.px, tiny=args.tiny)
    settings = [
        s
        for s in settings_for(args.methods, args.ratios, args.todo_factors)
        if not args.only or s[0] in args.only or s[3] is None
    ]
    reference_model = build(args.model, args.px, layers_for(args.model, args.blocks), args.tiny)
    measured = {k: len(v) for k, v in blocks_by_kind(args.model, reference_model).items()}
    depths = DEPTHS[args.model]
    # one model per setting sharing the weights, patched once: patching is not timed
    models: dict[str, nn.Module] = {}
    refused: dict[str, str] = {}
    for name, _, _, kwargs in settings:
        model = reference_model if kwargs is None else sharing_copy(reference_model)
        if kwargs is not None:
            pair = (
                {"cfg_halves": True} if args.cfg_halves and kwargs.get("method") != "todo" else {}
            )
            try:
                turbo_adapters.apply(model, use_rand=False, **kwargs, **pair)
            except (ValueError, TypeError, NotImplementedError) as error:  # its reason, printed
                refused[name] = str(error)
                continue
        models[name] = model
    params = sum(p.numel() for p in reference_model.parameters()) / 1e6
    blocks_text = ", ".join(f"{measured[k]} of {d} {k}" for k, d in depths.items())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model} at "
        f"{args.px} px ({(args.px // 16) ** 2} image tokens), blocks: {blocks_text} "
        f"({params:.0f} M parameters), batch {spec['batch']}",
        flush=True,
    )
    outputs: dict[str, torch.Tensor] = {}
    flops: dict[str, int] = {}
    flops_full: dict[str, float] = {}
    for name, model in models.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with FlopCounterMode(display=False, custom_mapping=_cpu_attention_ops()) as counter:
                meter = BlockMeter(blocks_by_kind(args.model, model), counter.get_total_flops)
                outputs[name] = meter.measure(lambda model=model: model(**x).sample)
                meter.remove()
        for w in caught:
            print(f"  {name}: {w.category.__name__}: {w.message}")
        flops[name] = meter.calls[0]["total"]
        flops_full[name] = project(meter.calls[0], measured, depths)
    reference = outputs["unpatched"]
    clocks = {
        name: BlockMeter(blocks_by_kind(args.model, model), time.perf_counter)
        for name, model in models.items()
    }
    start = time.perf_counter()
    timing = interleaved_throughput(
        {
            name: functools.partial(clocks[name].measure, lambda m=model: m(**x).sample)
            for name, model in models.items()
        },
        items_per_call=spec["batch"],
        repeats=args.repeats,
        warmup=args.warmup,
    )
    base = timing["methods"]["unpatched"]["seconds"]
    full = {
        name: [project(c, measured, depths) for c in clock.calls[-args.repeats :]]
        for name, clock in clocks.items()
    }
    print(
        f"timing: {time.perf_counter() - start:.0f} s, {args.repeats} rounds, load "
        f"{timing['load']['before']} -> {timing['load']['after']}",
        flush=True,
    )
    header = (
        f"{'setting':<22} {'FLOPs ratio':>11} {'speed-up':>9} {'interval':>13} "
        f"{'rel diff':>9} {'t/step s':>9} | projected to full depth: {'FLOPs r':>7} "
        f"{'speed-up':>9} {'interval':>13} {'t/step s':>9}"
    )
    print(header)
    rows = []
    for name, method, value, _ in settings:
        if name in refused:
            print(f"{name:<22} refused: {refused[name]}")
            rows.append(dict(model=args.model, px=args.px, setting=name, refused=refused[name]))
            continue
        row = timing["methods"][name]
        ratios = [b / t for b, t in zip(base, row["seconds"], strict=True)]
        full_ratios = [b / t for b, t in zip(full["unpatched"], full[name], strict=True)]
        diff = float((outputs[name] - reference).norm() / reference.norm())
        rows.append(
            dict(
                model=args.model,
                px=args.px,
                blocks=args.blocks,
                measured_blocks=measured,
                full_depth=depths,
                setting=name,
                method=method,
                value=value,
                flops_ratio=flops["unpatched"] / flops[name],
                speedup=row["speedup"],
                interval=[min(ratios), max(ratios)],
                seconds=row["seconds"],
                rel_diff=diff,
                projected_flops_ratio=flops_full["unpatched"] / flops_full[name],
                projected_speedup=statistics.median(full_ratios),
                projected_interval=[min(full_ratios), max(full_ratios)],
                projected_seconds=full[name],
                load=timing["load"],
            )
        )
        r = rows[-1]
        interval = f"[{min(ratios):.2f}, {max(ratios):.2f}]"
        full_interval = f"[{min(full_ratios):.2f}, {max(full_ratios):.2f}]"
        print(
            f"{name:<22} {r['flops_ratio']:>11.3f} {r['speedup']:>9.3f} {interval:>13} "
            f"{diff:>9.4f} {row['median_s']:>9.2f} | {'':>24} {r['projected_flops_ratio']:>7.3f} "
            f"{r['projected_speedup']:>9.3f} {full_interval:>13} "
            f"{statistics.median(full[name]):>9.1f}"
        )
    print(
        f"(unpatched median {statistics.median(base):.2f} s over {args.repeats} rounds; "
        "interval: lowest and highest round's speed-up; projected: the rest of the call once "
        "plus each kind of block at its measured per-block cost times the real model's count)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
    raise SystemExit(0)
