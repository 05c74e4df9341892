"""Rank connector-stage methods on ``easyvqa-real`` by real VQA accuracy at 64 / 32 / 16 tokens.

The DINOv2 tower runs unpatched once per test image (cached with its last-layer patch keys
and CLS attention); each method of :data:`turbo_eval.easyvqa_connector.CONNECTOR_CONFIGS`
cuts the 256 patch tokens to the budget, and the fusion sees CLS + the kept tokens, with and
without ``log(size)`` in its cross-attention. Text-guided Turbo
(:data:`~turbo_eval.easyvqa_connector.TEXT_GUIDED_CONFIGS`) cuts each question's copy with
the question's own guide (the fusion's first cross-attention). CDPruner is refused (see
that module).

In-tower rows at the same token count: ToMe and Turbo (CLS guide, alpha = 1) merging inside
the tower with r = 16 (65 tokens out: CLS + 64) and r = 20 (CLS + 16), so the fusion sees as
many tokens as after a connector cut to 64 or 16; the tower then costs fewer FLOPs, printed
per image beside them (FlopCounterMode with the attention counted).

Intervals: 95 % paired bootstrap of the per-question difference (turbo_eval.stats), with an
image's questions resampled together (cluster bootstrap; they share the image), against the
unpatched model, against Turbo redundancy-only (ToMe's criterion at the connector), against
VisionZip at the same budget and fusion setting, and against in-tower ToMe with as many
tokens.

    python benchmarks/easyvqa_real_connector.py [--test-images 1000] [--cache-dir DIR]
        [--budgets 64 32 16] [--plot-dir DIR] [--json out.json] [--in-tower 64 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

# the shared table helpers live in the in-tower script beside this one
from easyvqa_real_methods import format_difference, image_ids, points

from turbo_eval.easyvqa_connector import (
    CONNECTOR_CONFIGS,
    REFUSED,
    TEXT_GUIDED_CONFIGS,
    connector_tokens,
    text_guided_scores,
    tower_pass,
)
from turbo_eval.easyvqa_real import Hyper, build, cached_tower_tokens, score_questions
from turbo_eval.stats import paired_difference

_REDUNDANCY = "turbo redundancy-only"
_VISIONZIP = "visionzip"
_TOME = "tome (in tower)"
#: in-tower method -> overrides at r; r = 16 / 20 leave CLS + 64 / CLS + 16 tokens out of 257
IN_TOWER: dict[str, Any] = {
    _TOME: lambda r: {"r": r, "mode": "redundancy", "alpha": 0.0},
    "turbo a=1 (in tower)": lambda r: {
        "r": r,
        "mode": "turbo",
        "alpha": 1.0,
        "semantic_scale": 1.0,
    },
}
#: cache labels of the in-tower token passes
IN_TOWER_LABEL = {_TOME: "tome", "turbo a=1 (in tower)": "turbo_a1"}
#: patch tokens kept -> the r (tokens merged per block) that leaves CLS + k of 257 in a
#: 12-block DINOv2-S: 16 a block for 64; for 16, 21 a block then 9 in the last (one bipartite
#: step can merge at most half of its 26 tokens there; a flat r=20 would be clipped to 18)
R_FOR_KEPT: dict[int, Any] = {64: 16, 16: [21] * 11 + [9]}


class _ScoreCache:
    """Per-question scores by config, stored under the model key and image count, so a
    re-run (another budget, after a crash) re-scores nothing it already has."""

    def __init__(self, model: Any, count: int, cache_dir: str | None) -> None:
        from turbo_eval.easyvqa_real import _cache_root

        self.folder = _cache_root(cache_dir) / "connector-scores" / f"{model.key}-{count}"

    def _path(self, key: str) -> Path:
        return self.folder / (key.replace(" ", "_").replace("/", "-") + ".npy")

    def get(self, keys: list[str], compute: Any) -> dict[str, np.ndarray]:
        """The scores of ``keys``; ``compute()`` returns them all (a dict) when any is missing."""
        if all(self._path(k).is_file() for k in keys):
            return {k: np.load(self._path(k)) for k in keys}
        values = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        for k in keys:
            np.save(self._path(k), np.asarray(values[k]))
        return {k: np.asarray(values[k]) for k in keys}


def _both(name: str, budget: int) -> list[str]:
    return [f"{name} k={budget}", f"{name} k={budget} +log(size)"]


def run(
    budgets: list[int],
    count: int,
    cache_dir: str | None,
    hyper: Hyper,
    in_tower: tuple[int, ...] = tuple(R_FOR_KEPT),
) -> dict[str, Any]:
    model = build(hyper, cache_dir)
    cache = _ScoreCache(model, count, cache_dir)
    start = time.perf_counter()
    data = tower_pass(model, count, cache_dir, progress=True)
    tower_seconds = time.perf_counter() - start
    keep = _keep(count)
    groups = np.asarray(image_ids())[keep]  # an image's questions resample together
    flops = {"unpatched": _tower_gflops(model, None)}
    scores: dict[str, np.ndarray] = {}
    rows: list[tuple[str, str, int, bool]] = []

    def add(name: str, budget: int, compute: Any) -> None:
        keys = _both(name, budget)
        scores.update(cache.get(keys, lambda: dict(zip(keys, compute(), strict=True))))
        rows.extend(
            (key, name, budget, bias) for key, bias in zip(keys, (False, True), strict=True)
        )
        print(f"{name} k={budget}: {100 * scores[keys[0]].mean():.2f} %", flush=True)

    def fusion_scores(tokens: Any, sizes: Any) -> list[np.ndarray]:
        return [score_questions(model, tokens, sizes, keep, size_bias=b) for b in (False, True)]

    for bias in (False, True):
        key = "unpatched" + (" +log(size)" if bias else "")
        scores[key] = score_questions(model, data["tokens"], None, keep, size_bias=bias)
        rows.append((key, "unpatched", 256, bias))
    for budget in budgets:
        for name in CONNECTOR_CONFIGS:
            add(
                name,
                budget,
                lambda name=name, budget=budget: fusion_scores(
                    *connector_tokens(data, name, budget)
                ),
            )
        for name in TEXT_GUIDED_CONFIGS:

            def guided(name: str = name, budget: int = budget) -> list[np.ndarray]:
                both = text_guided_scores(model, data, name, budget, keep)
                return [both[False], both[True]]

            add(name, budget, guided)
        if budget in in_tower:
            r = R_FOR_KEPT[budget]
            for name, overrides in IN_TOWER.items():
                flops[f"{name} k={budget}"] = _tower_gflops(model, overrides(r))

                def tower(
                    name: str = name, overrides: Any = overrides, budget: int = budget, r: Any = r
                ) -> list[np.ndarray]:
                    tokens, sizes = cached_tower_tokens(
                        model,
                        IN_TOWER_LABEL[name] + (f"-r{r}" if isinstance(r, int) else f"-k{budget}"),
                        overrides(r),
                        cache_dir,
                        count,
                        progress=True,
                    )
                    if tokens.shape[1] != 1 + budget:
                        raise RuntimeError(
                            f"{name} r={r} left {tokens.shape[1]} tokens, not {1 + budget}"
                        )
                    return fusion_scores(tokens, sizes)

                add(name, budget, tower)
    table = []
    for key, name, budget, bias in rows:
        suffix = " +log(size)" if bias else ""

        def versus(other_key: str, key: str = key) -> dict[str, Any] | None:
            if other_key not in scores or other_key == key:
                return None
            return points(paired_difference(scores[key], scores[other_key], groups=groups))

        plain = key.removesuffix(" +log(size)")
        row: dict[str, Any] = {
            "config": key,
            "method": name,
            "kept": budget,
            "log_size": bias,
            "accuracy": 100 * float(scores[key].mean()),
            "tower_gflops": flops.get(plain, flops["unpatched"]),
        }
        if name != "unpatched":
            row["vs_unpatched"] = versus("unpatched" + suffix)
            row["vs_redundancy"] = versus(f"{_REDUNDANCY} k={budget}{suffix}")
            row["vs_visionzip"] = versus(f"{_VISIONZIP} k={budget}{suffix}")
            row["vs_tome_tower"] = versus(f"{_TOME} k={budget}{suffix}")
        if bias:
            row["vs_no_log_size"] = versus(plain)
        table.append(row)
    return {
        "model": model.key,
        "images": count,
        "questions": len(keep),
        "tower_seconds": tower_seconds,
        "refused": REFUSED,
        "rows": table,
    }


def _tower_gflops(model: Any, overrides: dict[str, Any] | None) -> float:
    """The tower's GFLOPs on one 224 px image with ``overrides`` applied (attention counted)."""
    import torch

    from turbo_eval.measure import count_flops

    pixels = torch.zeros(1, 3, model.hyper.resolution, model.hyper.resolution)
    model.set_method(overrides)
    try:
        with torch.inference_mode():
            return count_flops(model.module, pixels) / 1e9
    finally:
        model.set_method(None)


def _keep(count: int) -> list[int]:
    import easy_vqa

    _, _, image_ids = easy_vqa.get_test_questions()
    return [i for i, im in enumerate(image_ids) if im < count]


def format_table(result: dict[str, Any]) -> str:
    """Markdown table, best accuracy first within each budget and fusion setting."""
    lines = [
        f"easyvqa-real {result['model']}, connector stage: VQA accuracy on "
        f"{result['questions']} test questions ({result['images']} images); differences in "
        "points, 95 % paired cluster bootstrap over images (* = interval excludes 0); "
        "tower GFLOPs per image",
        "",
        "| config | patch tokens kept | tower GFLOPs | accuracy % | vs unpatched "
        "| vs redundancy-only | vs VisionZip | vs ToMe in tower | +log(size) vs without |",
        "|---|---:|---:|---:|---|---|---|---|---|",
    ]
    ordered = sorted(
        result["rows"], key=lambda row: (-row["kept"], row["log_size"], -row["accuracy"])
    )
    for row in ordered:
        lines.append(
            f"| {row['config']} | {row['kept']} | {row['tower_gflops']:.2f} "
            f"| {row['accuracy']:.2f} "
            f"| {format_difference(row.get('vs_unpatched'))} | {format_difference(row.get('vs_redundancy'))} "
            f"| {format_difference(row.get('vs_visionzip'))} | {format_difference(row.get('vs_tome_tower'))} "
            f"| {format_difference(row.get('vs_no_log_size'))} |"
        )
    for name, why in result["refused"].items():
        lines.append(f"\n{name}: refused here ({why}).")
    return "\n".join(lines)


def plot(result: dict[str, Any], folder: str) -> Path:
    """Accuracy against patch tokens kept, one line per method (dashed: +log(size))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    base = next(r for r in result["rows"] if r["config"] == "unpatched")["accuracy"]
    ax.axhline(base, color="black", lw=0.8, label=f"unpatched (256 tokens) {base:.2f} %")
    names = list(CONNECTOR_CONFIGS) + list(TEXT_GUIDED_CONFIGS) + list(IN_TOWER)
    for i, name in enumerate(names):
        for bias in (False, True):
            pts = sorted(
                (r["kept"], r["accuracy"])
                for r in result["rows"]
                if r["method"] == name and r["log_size"] == bias
            )
            if not pts:
                continue
            ax.plot(
                *zip(*pts, strict=True),
                marker="o",
                color=f"C{i}",
                ls="--" if bias else "-",
                label=name + (" +log(size)" if bias else ""),
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("image patch tokens kept (of 256)")
    ax.set_ylabel("VQA accuracy %")
    ax.set_title(
        f"easyvqa-real connector stage, {result['questions']} test questions\n"
        "(in-tower rows merge inside DINOv2 and cost fewer FLOPs)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "easyvqa_real_connector.png"
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 32, 16])
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--train-images", type=int, default=Hyper.train_images)
    parser.add_argument("--plot-dir", default=None, help="write the plot into this folder")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument(
        "--in-tower",
        type=int,
        nargs="*",
        default=list(R_FOR_KEPT),
        choices=list(R_FOR_KEPT),
        help="budgets that also get in-tower ToMe / Turbo rows (none: skip them)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(
        args.budgets,
        args.test_images,
        args.cache_dir,
        Hyper(train_images=args.train_images),
        in_tower=tuple(args.in_tower),
    )
    result["seconds"] = time.perf_counter() - start
    print(format_table(result))
    print(
        f"\n{result['questions']} questions; tower pass {result['tower_seconds']:.0f} s, "
        f"total {result['seconds']:.0f} s"
    )
    if args.plot_dir:
        print(f"plot: {plot(result, args.plot_dir)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
