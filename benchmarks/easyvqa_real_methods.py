"""Rank in-tower reduction methods on ``easyvqa-real`` by real VQA accuracy.

Every method patches the DINOv2 tower of the model (``turbo_adapters.apply``); the trained
fusion sees the reduced token set, with and without ``log(size)`` in its cross-attention.
Methods at the same r keep the same number of tokens in every block, so they cost the same
FLOPs (Turbo's semantic row is O(N d) per block, well under 1 % of a block).

Accuracy is the official VQA accuracy on all 9,673 easy-VQA test questions (1,000 images);
intervals are paired bootstrap intervals (95 %) of the per-question difference, an image's
questions resampled together (cluster bootstrap), against the unpatched model and against
ToMe at the same r and the same fusion setting.

    python benchmarks/easyvqa_real_methods.py [--r 8 16] [--cache-dir DIR] [--json out.json]

Tower outputs of each method are cached, so a second run only re-scores.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from turbo_eval.easyvqa_real import Hyper, build, cached_tower_tokens, score_questions
from turbo_eval.stats import paired_difference

#: method name -> overrides at r (ToMe, Turbo with the CLS guide at the reference alpha
#: 5 x 30 and at a small alpha, semantics-only)
METHODS: dict[str, Any] = {
    "tome": lambda r: {"r": r, "mode": "redundancy", "alpha": 0.0},
    "turbo a=5x30": lambda r: {"r": r, "mode": "turbo", "alpha": 5.0, "semantic_scale": 30.0},
    "turbo a=1": lambda r: {"r": r, "mode": "turbo", "alpha": 1.0, "semantic_scale": 1.0},
    "semantics": lambda r: {"r": r, "mode": "semantics"},
}


def run(
    r_values: list[int],
    methods: list[str],
    cache_dir: str | None,
    limit_images: int | None,
    hyper: Hyper,
) -> dict[str, Any]:
    model = build(hyper, cache_dir)
    configs: list[tuple[str, int, dict[str, Any] | None]] = [("unpatched", 0, None)]
    for r in r_values:
        configs += [(m, r, METHODS[m](r)) for m in methods]
    scores: dict[str, np.ndarray] = {}
    rows = []
    for name, r, overrides in configs:
        start = time.perf_counter()
        label = name.replace(" ", "_").replace("=", "").replace("x", "x") + f"-r{r}"
        tokens, sizes = cached_tower_tokens(
            model, label, overrides, cache_dir, limit_images, progress=True
        )
        for bias in (False, True):
            key = f"{name} r={r}" + (" +log(size)" if bias else "")
            scores[key] = score_questions(model, tokens, sizes, _keep(limit_images), size_bias=bias)
            rows.append((key, name, r, bias, int(tokens.shape[1])))
        print(f"{name} r={r}: {time.perf_counter() - start:.0f} s", flush=True)
    groups = np.asarray(image_ids())[_keep(limit_images) or slice(None)]
    table = []
    for key, name, r, bias, kept in rows:
        row: dict[str, Any] = {
            "config": key,
            "method": name,
            "r": r,
            "log_size": bias,
            "tokens_out": kept,
            "accuracy": 100 * float(scores[key].mean()),
        }
        base = "unpatched r=0" + (" +log(size)" if bias else "")
        if key != base:
            row["vs_unpatched"] = points(
                paired_difference(scores[key], scores[base], groups=groups)
            )
        tome = f"tome r={r}" + (" +log(size)" if bias else "")
        if name != "tome" and tome in scores:
            row["vs_tome"] = points(paired_difference(scores[key], scores[tome], groups=groups))
        if bias:
            plain = key.removesuffix(" +log(size)")
            row["vs_no_log_size"] = points(
                paired_difference(scores[key], scores[plain], groups=groups)
            )
        table.append(row)
    n = len(next(iter(scores.values())))
    return {"model": model.key, "questions": n, "hyper": vars(hyper), "rows": table}


def _keep(limit_images: int | None) -> list[int] | None:
    if limit_images is None:
        return None
    import easy_vqa

    _, _, image_ids = easy_vqa.get_test_questions()
    return [i for i, im in enumerate(image_ids) if im < limit_images]


def image_ids() -> list[int]:
    """The image of every easy-VQA test question (the cluster of its bootstrap)."""
    import easy_vqa

    return list(easy_vqa.get_test_questions()[2])


def points(interval: Any) -> dict[str, Any]:
    """A difference interval in points, as the tables store it."""
    return {
        "mean": 100 * interval.mean,
        "low": 100 * interval.low,
        "high": 100 * interval.high,
        "resolved": interval.excludes_zero,
    }


def format_difference(diff: dict[str, Any] | None) -> str:
    """``+0.12 [-0.03, +0.27] *`` (``*``: the interval excludes 0), ``-`` for none."""
    if diff is None:
        return "-"
    star = " *" if diff["resolved"] else ""
    return f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]{star}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown ranking table (best accuracy first within each r and fusion setting)."""
    lines = [
        f"easyvqa-real {result['model']}: VQA accuracy on {result['questions']} test "
        "questions; differences in points with 95 % paired bootstrap intervals "
        "(cluster bootstrap over images; * = interval excludes 0)",
        "",
        "| config | tokens out | accuracy % | vs unpatched | vs ToMe same r | "
        "+log(size) vs without |",
        "|---|---:|---:|---|---|---|",
    ]
    ordered = sorted(result["rows"], key=lambda row: (row["r"], row["log_size"], -row["accuracy"]))
    for row in ordered:
        lines.append(
            f"| {row['config']} | {row['tokens_out']} | {row['accuracy']:.2f} "
            f"| {format_difference(row.get('vs_unpatched'))} | {format_difference(row.get('vs_tome'))} "
            f"| {format_difference(row.get('vs_no_log_size'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--test-images", type=int, default=None, help="default: all 1,000")
    parser.add_argument("--train-images", type=int, default=Hyper.train_images)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(
        args.r,
        args.methods,
        args.cache_dir,
        args.test_images,
        Hyper(train_images=args.train_images),
    )
    result["seconds"] = time.perf_counter() - start
    print(format_table(result))
    print(f"\n{result['seconds']:.0f} s (measured under load from parallel work)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
