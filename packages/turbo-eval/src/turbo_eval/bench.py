"""``turbo-eval bench MODEL``: throughput, latency, FLOPs and peak memory over a sweep of r."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .methods import apply_method
from .models import load_model
from .noise import format_ratio, speed_ratio

__all__ = ["bench_model", "format_bench"]


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
    from .measure import count_flops, interleaved_throughput, peak_memory

    model = loaded if loaded is not None else load_model(name, resolution)
    inputs = model.prepare(_items(model.modality, batch, resolution or 224, seed))
    configs: dict[str, dict[str, Any] | None] = {"unpatched": None}
    for r in r_values:
        for mode in modes:
            configs[f"{mode} r={r}"] = {
                "r": r,
                "mode": mode,
                "alpha": alpha if mode == "turbo" else 0.0,
                "semantic_scale": semantic_scale,
            }

    def runner(overrides: dict[str, Any] | None):
        def run() -> object:
            apply_method(model, overrides)
            return model.forward_features(model.module, inputs, model.handle)

        return run

    fns = {key: runner(overrides) for key, overrides in configs.items()}
    rows: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for key, fn in fns.items():
            rows[key] = {
                "flops_per_item": count_flops(fn) / batch,
                "peak_memory_bytes": peak_memory(fn),
            }
            state = model.handle.last_state if model.handle is not None else None
            rows[key]["tokens_after_last_block"] = state.token_counts[-1] if state else None
        timing = interleaved_throughput(
            fns, items_per_call=batch, repeats=repeats, warmup=1, baseline="unpatched"
        )
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
    return {"load_before": load.get("before"), "load_after": load.get("after")}


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
