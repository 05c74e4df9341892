"""Fidelity against speed per model, from the JSON rows of ``benchmarks/dit.py --json``.

One figure per model (``<out>/pareto_<model>_<px>px.png``): x the speed-up over the
unpatched step (with the interval of rounds), y the relative difference of the step's
output (lower is better); the Pareto front (no other setting both faster and closer) is
joined. Figures are labelled "measured under load from parallel work".

Usage::

    python benchmarks/dit_pareto.py OUT_DIR rows.json [more.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both speed-up (higher) and relative difference (lower)."""
    front = [
        r
        for r in rows
        if not any(
            o["speedup"] >= r["speedup"]
            and o["rel_diff"] <= r["rel_diff"]
            and (o["speedup"], o["rel_diff"]) != (r["speedup"], r["rel_diff"])
            for o in rows
        )
    ]
    return sorted(front, key=lambda r: r["speedup"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for the figures (created)")
    parser.add_argument("rows", nargs="+", type=Path, help="JSON files of benchmarks/dit.py")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for path in args.rows for r in json.loads(path.read_text())]
    args.out.mkdir(parents=True, exist_ok=True)
    for key in sorted({(r["model"], r["px"], r["blocks"]) for r in rows}):
        model, px, blocks = key
        group = [r for r in rows if (r["model"], r["px"], r["blocks"]) == key]
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for r in group:
            low, high = r["interval"]
            ax.errorbar(
                r["speedup"],
                r["rel_diff"],
                xerr=[[r["speedup"] - low], [high - r["speedup"]]],
                fmt="o",
                capsize=3,
            )
            ax.annotate(
                r["setting"],
                (r["speedup"], r["rel_diff"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=8,
            )
        front = pareto(group)
        ax.plot([r["speedup"] for r in front], [r["rel_diff"] for r in front], "k--", lw=0.8)
        ax.set_xlabel("speed-up of one denoising step (median; bars: rounds' range)")
        ax.set_ylabel("relative difference to the unpatched step")
        ax.set_title(
            f"{model}, {px} px, {blocks} blocks, full width, random weights\n"
            "measured under load from parallel work",
            fontsize=9,
        )
        fig.tight_layout()
        path = args.out / f"pareto_{model}_{px}px.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
