"""``turbo-eval bench MODEL``: throughput, latency, FLOPs and peak memory over a sweep of r."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..methods import MethodSettings, method_overrides
from ..models import load_model
from ..noise import format_ratio, speed_ratio
from ..runner import profile_methods, time_methods

__all__ = ["bench_model", "format_bench", "main"]


def _items(modality: str, batch: int, resolution: int, seed: int) -> list[Any]:
    if modality == "text":
        from .assets.text import load_definition_pairs

        return [d for _, d in load_definition_pairs(limit=batch, seed=seed)]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for _ in range(batch)]


def bench_model(
    name: str,
    r_values: Sequence[int] = (0, 4, 8, 16),
    batch: int = 16,
    repeats: int = 5,
    resolution: int | None = None,
    alpha: float = 5.0,
    semantic_scale: float = 30.0,
    modes: Sequence[str] = ("turbo",),
    seed: int = 0,
    loaded: Any = None,
) -> dict[str, Any]:
    """Patched (at each r) against unpatched, timed interleaved in one process.

    Returns per configuration: items/s, median batch latency, FLOPs per item and peak
    memory, plus the median pairwise throughput ratio and the FLOPs ratio against
    the unpatched model.
    """
    model = loaded if loaded is not None else load_model(name, resolution)
    inputs = model.prepare(_items(model.modality, batch, resolution or 224, seed))
    settings = MethodSettings(alpha=(alpha,), semantic_scale=semantic_scale)
    configs: dict[str, dict[str, Any] | None] = {"unpatched": None}
    for r in r_values:
        for mode in modes:  # a mode is the method of that name
            configs[f"{mode} r={r}"] = method_overrides(mode, r, settings)
    profiled = profile_methods(model, inputs, configs, memory=True)
    rows: dict[str, dict[str, Any]] = {
        key: {
            "flops_per_item": row["flops"] / batch,
            "peak_memory_bytes": row["peak_memory_bytes"],
            "tokens_after_last_block": row["tokens_after_last_block"],
        }
        for key, row in profiled.items()
    }
    timing = time_methods(model, inputs, configs, batch, repeats, baseline="unpatched")
    model.set_method(None)
    base_flops = rows["unpatched"]["flops_per_item"]
    load = timing["load"]
    for key, row in rows.items():
        t = timing["methods"][key]
        row.update(
            items_per_s=t["items_per_s"],
            latency_s=t["median_s"],
            speedup=t["speedup"],
            flops_ratio=base_flops / row["flops_per_item"] if row["flops_per_item"] else None,
            seconds=t["seconds"],
            # paired interval over rounds and the noise flag (turbo_eval.noise)
            speed=speed_ratio(
                timing["methods"]["unpatched"]["seconds"], t["seconds"], **_loads(load)
            ).as_dict(),
        )
    # Turbo against redundancy-only at the same r: median of the per-round ratios
    versus, versus_speed = {}, {}
    for r in r_values:
        turbo, tome = f"turbo r={r}", f"redundancy r={r}"
        if turbo in rows and tome in rows:
            ratios = [
                a / b for a, b in zip(rows[tome]["seconds"], rows[turbo]["seconds"], strict=True)
            ]
            versus[f"r={r}"] = statistics.median(ratios)
            versus_speed[f"r={r}"] = speed_ratio(
                rows[tome]["seconds"], rows[turbo]["seconds"], **_loads(load)
            ).as_dict()
    return {
        "model": name,
        "batch": batch,
        "repeats": repeats,
        "modes": list(modes),
        "alpha": alpha,
        "semantic_scale": semantic_scale,
        "torch_threads": torch.get_num_threads(),
        "configs": rows,
        "turbo_over_redundancy": versus,
        "turbo_over_redundancy_speed": versus_speed,
        "load": load,
    }


def _loads(load: dict[str, Any]) -> dict[str, Any]:
    return {
        "load_before": load.get("before"),
        "load_after": load.get("after"),
        "own_threads": load.get("threads"),
        "other_cores": load.get("other_cores"),
    }


def format_bench(figures: dict[str, Any]) -> str:
    """A Markdown table of :func:`bench_model`'s figures."""
    lines = [
        f"{figures['model']}: batch {figures['batch']}, {figures['torch_threads']} threads, "
        f"modes {', '.join(figures['modes'])}, median of {figures['repeats']} interleaved repeats",
        "",
        "| config | tokens out | GFLOPs/item | FLOPs ratio | items/s (this CPU) "
        "| latency (s/batch) | throughput [95% interval over rounds] | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in figures["configs"].items():
        tokens = row["tokens_after_last_block"]
        lines.append(
            f"| {key} | {tokens if tokens is not None else '-'} | {row['flops_per_item'] / 1e9:.2f} "
            f"| {row['flops_ratio']:.2f}x | {row['items_per_s']:.1f} | {row['latency_s']:.3f} "
            f"| {format_ratio(row['speed']) if 'speed' in row else format(row['speedup'], '.2f') + 'x'} "
            f"| {row['peak_memory_bytes'] / 2**20:.0f} |"
        )
    speeds = figures.get("turbo_over_redundancy_speed", {})
    for r, ratio in figures.get("turbo_over_redundancy", {}).items():
        lines.append(
            f"\nTurbo / redundancy-only throughput at {r}: {ratio:.3f} (median of per-round ratios)"
            + (f"; {format_ratio(speeds[r])}" if r in speeds else "")
        )
    load = figures.get("load") or {}
    if load.get("before") is not None:
        lines.append(
            f"\nload average (1 min) {load['before']:.2f} before, {load['after']:.2f} after; "
            "! marks a ratio whose rounds disagree or whose machine load changed or was busy"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``turbo-eval bench``: the table, and the figures as JSON with ``--out``."""
    figures = bench_model(
        args.model,
        r_values=args.r,
        batch=args.batch,
        repeats=args.repeats,
        resolution=args.resolution,
        alpha=args.alpha,
        semantic_scale=args.semantic_scale,
        modes=args.modes,
    )
    print(format_bench(figures))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0
