"""Rank connector-stage methods on ``easyvqa-real`` by real VQA accuracy at 64 / 32 / 16 tokens.

The DINOv2 tower runs unpatched once per test image (cached with its last-layer patch keys
and CLS attention); each method of :data:`turbo_eval.easyvqa_connector.CONNECTOR_CONFIGS`
cuts the 256 patch tokens to the budget, and the fusion sees CLS + the kept tokens, with and
without ``log(size)`` in its cross-attention. CDPruner is refused (see that module).

Intervals: 95 % paired bootstrap of the per-question difference (turbo_eval.stats), against
the unpatched model, against Turbo redundancy-only (ToMe's criterion at the connector) and
against VisionZip at the same budget and fusion setting.

    python benchmarks/easyvqa_real_connector.py [--test-images 1000] [--cache-dir DIR]
        [--budgets 64 32 16] [--plot-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from turbo_eval.easyvqa_connector import CONNECTOR_CONFIGS, REFUSED, connector_tokens, tower_pass
from turbo_eval.easyvqa_real import Hyper, build, score_questions
from turbo_eval.stats import paired_difference

_REDUNDANCY = "turbo redundancy-only"
_VISIONZIP = "visionzip"


def run(budgets: list[int], count: int, cache_dir: str | None, hyper: Hyper) -> dict[str, Any]:
    model = build(hyper, cache_dir)
    start = time.perf_counter()
    data = tower_pass(model, count, cache_dir, progress=True)
    tower_seconds = time.perf_counter() - start
    keep = _keep(count)
    scores: dict[str, np.ndarray] = {}
    rows: list[tuple[str, str, int, bool]] = []
    for bias in (False, True):
        key = "unpatched" + (" +log(size)" if bias else "")
        scores[key] = score_questions(model, data["tokens"], None, keep, size_bias=bias)
        rows.append((key, "unpatched", 256, bias))
    for budget in budgets:
        for name in CONNECTOR_CONFIGS:
            tokens, sizes = connector_tokens(data, name, budget)
            for bias in (False, True):
                key = f"{name} k={budget}" + (" +log(size)" if bias else "")
                scores[key] = score_questions(model, tokens, sizes, keep, size_bias=bias)
                rows.append((key, name, budget, bias))
            print(f"{name} k={budget}: {100 * scores[key].mean():.2f} %", flush=True)
    table = []
    for key, name, budget, bias in rows:
        suffix = " +log(size)" if bias else ""
        row: dict[str, Any] = {
            "config": key,
            "method": name,
            "kept": budget,
            "log_size": bias,
            "accuracy": 100 * float(scores[key].mean()),
        }
        if name != "unpatched":
            row["vs_unpatched"] = _pts(paired_difference(scores[key], scores["unpatched" + suffix]))
            for other, field in ((_REDUNDANCY, "vs_redundancy"), (_VISIONZIP, "vs_visionzip")):
                if name != other:
                    ref = scores[f"{other} k={budget}{suffix}"]
                    row[field] = _pts(paired_difference(scores[key], ref))
        if bias:
            plain = key.removesuffix(" +log(size)")
            row["vs_no_log_size"] = _pts(paired_difference(scores[key], scores[plain]))
        table.append(row)
    return {
        "model": model.key,
        "images": count,
        "questions": len(keep),
        "tower_seconds": tower_seconds,
        "refused": REFUSED,
        "rows": table,
    }


def _keep(count: int) -> list[int]:
    import easy_vqa

    _, _, image_ids = easy_vqa.get_test_questions()
    return [i for i, im in enumerate(image_ids) if im < count]


def _pts(interval: Any) -> dict[str, Any]:
    return {
        "mean": 100 * interval.mean,
        "low": 100 * interval.low,
        "high": 100 * interval.high,
        "resolved": interval.excludes_zero,
    }


def _fmt(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "-"
    star = " *" if diff["resolved"] else ""
    return f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]{star}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown table, best accuracy first within each budget and fusion setting."""
    lines = [
        f"easyvqa-real {result['model']}, connector stage: VQA accuracy on "
        f"{result['questions']} test questions ({result['images']} images); differences in "
        "points, 95 % paired bootstrap (* = interval excludes 0)",
        "",
        "| config | patch tokens kept | accuracy % | vs unpatched | vs redundancy-only "
        "| vs VisionZip | +log(size) vs without |",
        "|---|---:|---:|---|---|---|---|",
    ]
    ordered = sorted(
        result["rows"], key=lambda row: (-row["kept"], row["log_size"], -row["accuracy"])
    )
    for row in ordered:
        lines.append(
            f"| {row['config']} | {row['kept']} | {row['accuracy']:.2f} "
            f"| {_fmt(row.get('vs_unpatched'))} | {_fmt(row.get('vs_redundancy'))} "
            f"| {_fmt(row.get('vs_visionzip'))} | {_fmt(row.get('vs_no_log_size'))} |"
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
    for i, name in enumerate(CONNECTOR_CONFIGS):
        for bias in (False, True):
            pts = sorted(
                (r["kept"], r["accuracy"])
                for r in result["rows"]
                if r["method"] == name and r["log_size"] == bias
            )
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
        "(measured under load from parallel work)",
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
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(
        args.budgets, args.test_images, args.cache_dir, Hyper(train_images=args.train_images)
    )
    result["seconds"] = time.perf_counter() - start
    print(format_table(result))
    print(
        f"\n{result['questions']} questions; tower pass {result['tower_seconds']:.0f} s, "
        f"total {result['seconds']:.0f} s (measured under load from parallel work)"
    )
    if args.plot_dir:
        print(f"plot: {plot(result, args.plot_dir)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
