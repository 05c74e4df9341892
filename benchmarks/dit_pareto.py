"""Fidelity against speed per model, from the JSON rows of ``benchmarks/dit.py --json``.

One figure per model and resolution (``<out>/pareto_<model>_<px>px.png``): x the
speed-up over the unpatched step (with the interval of rounds), y the relative
difference of the step's output (lower is better); each method's sweep (ratios, or
ToDo's factors) is one coloured line, and the Pareto front over all settings (no other
setting both faster and closer) is the dashed black line. ``--projected`` plots the
speed-up projected to the real model's depth instead (``..._projected.png``, labelled).
Settings the library refused are left out. Figures are labelled "under load (parallel
work)".

Usage::

    python benchmarks/dit_pareto.py OUT_DIR rows.json [more.json ...] [--projected]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: a colour per method, the same in every figure
COLOURS = {
    "unpatched": "black",
    "turbo": "tab:blue",
    "redundancy": "tab:cyan",
    "attn-only": "tab:purple",
    "todo": "tab:orange",
    "toma": "tab:red",
}


def pareto(rows: list[dict[str, Any]], speed: str = "speedup") -> list[dict[str, Any]]:
    """The rows no other row beats on both ``speed`` (higher) and relative difference
    (lower), by increasing speed."""
    front = [
        r
        for r in rows
        if not any(
            o[speed] >= r[speed]
            and o["rel_diff"] <= r["rel_diff"]
            and (o[speed], o["rel_diff"]) != (r[speed], r["rel_diff"])
            for o in rows
        )
    ]
    return sorted(front, key=lambda r: r[speed])


def plot(ax: Any, rows: list[dict[str, Any]], projected: bool) -> None:
    """Every setting of one model and resolution on ``ax``: points with their interval,
    a line per method through its sweep, the Pareto front dashed."""
    speed, interval = (
        ("projected_speedup", "projected_interval")
        if projected
        else (
            "speedup",
            "interval",
        )
    )
    methods = sorted({r.get("method", r["setting"].split()[0]) for r in rows})
    for method in methods:
        group = [r for r in rows if r.get("method", r["setting"].split()[0]) == method]
        group.sort(key=lambda r: (r.get("value", 0), r[speed]))  # along the sweep
        colour = COLOURS.get(method, "tab:gray")
        for r in group:
            low, high = r[interval]
            ax.errorbar(
                r[speed],
                r["rel_diff"],
                xerr=[[max(r[speed] - low, 0)], [max(high - r[speed], 0)]],
                fmt="o",
                color=colour,
                capsize=3,
                alpha=0.8,
            )
            ax.annotate(
                r["setting"],
                (r[speed], r["rel_diff"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        ax.plot(
            [r[speed] for r in group],
            [r["rel_diff"] for r in group],
            "-",
            color=colour,
            lw=1,
            label=method,
        )
    front = pareto(rows, speed)
    ax.plot([r[speed] for r in front], [r["rel_diff"] for r in front], "k--", lw=0.8)
    ax.margins(x=0.08, y=0.12)
    ax.legend(fontsize=7, loc="lower right")


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for the figures (created)")
    parser.add_argument("rows", nargs="+", type=Path, help="JSON files of benchmarks/dit.py")
    parser.add_argument(
        "--projected", action="store_true", help="speed-up projected to the full depth"
    )
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = [r for path in args.rows for r in json.loads(path.read_text())]
    rows = [r for r in every if "refused" not in r]
    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for model, px in sorted({(r["model"], r["px"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["px"]) == (model, px)]
        blocks = ", ".join(sorted({_blocks(r) for r in group}))
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        plot(ax, group, args.projected)
        what = "projected to full depth" if args.projected else f"measured with {blocks}"
        ax.set_xlabel(
            f"speed-up of one denoising step, {'projected' if args.projected else 'measured'} "
            "(median; bars: rounds' range)"
        )
        ax.set_ylabel("relative difference to the unpatched step")
        refused = sorted(
            {r["setting"] for r in every if "refused" in r and (r["model"], r["px"]) == (model, px)}
        )
        note = f"; refused: {', '.join(refused)}" if refused else ""
        ax.set_title(
            f"{model}, {px} px, full width, random weights, {what}\n"
            f"under load (parallel work){note}",
            fontsize=8,
        )
        fig.tight_layout()
        suffix = "_projected" if args.projected else ""
        path = args.out / f"pareto_{model}_{px}px{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        print(path)
        paths.append(path)
    return paths


def _blocks(row: dict[str, Any]) -> str:
    measured = row.get("measured_blocks")
    if not measured:
        return f"{row['blocks']} blocks"
    names = {"block": "blocks"}  # PixArt's one kind
    return " + ".join(f"{n} {names.get(kind, kind)}" for kind, n in measured.items() if n)


if __name__ == "__main__":
    main()
    raise SystemExit(0)
