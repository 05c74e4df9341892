"""Paper-style tables (Markdown, CSV, JSON) and the accuracy-against-throughput Pareto plot."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .results import ResultStore

__all__ = ["Row", "collect_rows", "markdown_table", "pareto_plot", "write_report"]

METHOD_ORDER = {"baseline": 0, "redundancy": 1, "semantics": 2, "turbo": 3}


@dataclasses.dataclass
class Row:
    """One line of the table."""

    model: str
    task: str
    method: str
    label: str
    r: int
    metric: str
    value: float
    delta: float | None
    gflops: float | None
    flops_ratio: float | None
    items_per_s: float | None
    speedup: float | None
    run: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def collect_rows(results: Iterable[str | Path]) -> list[Row]:
    """Rows from one or more results folders (cells joined with their speed files)."""
    rows: list[Row] = []
    for root in results:
        store = ResultStore(root)
        if not (store.root / "cells").is_dir():
            raise FileNotFoundError(f"{root} is not a turbo-eval results folder (no cells/)")
        cells = store.cells()
        baselines = {
            (c["model"], c["task"]): c["metrics"][c["metric"]]
            for c in cells
            if c["method"] == "baseline"
        }
        for cell in cells:
            speed = store.read_speed(cell["model"], cell["task"]) or {}
            flops = speed.get("flops_per_item", {})
            timing = speed.get("timing", {}).get("methods", {}).get(_key(cell), {})
            base_flops = next((v for k, v in flops.items() if "__baseline__" in k), None)
            own_flops = flops.get(_key(cell))
            value = float(cell["metrics"][cell["metric"]])
            base = baselines.get((cell["model"], cell["task"]))
            rows.append(
                Row(
                    model=cell["model"],
                    task=cell["task"],
                    method=cell["method"],
                    label=cell["label"],
                    r=int(cell["r"]),
                    metric=cell["metric"],
                    value=value,
                    delta=None if base is None else value - base,
                    gflops=None if own_flops is None else own_flops / 1e9,
                    flops_ratio=None if not (own_flops and base_flops) else base_flops / own_flops,
                    items_per_s=timing.get("items_per_s"),
                    speedup=timing.get("speedup"),
                    run=str(root),
                )
            )
    rows.sort(key=lambda r: (r.run, r.model, r.task, r.r, METHOD_ORDER.get(r.method, 9)))
    return rows


def _key(cell: dict[str, Any]) -> str:
    from .methods import Cell

    return Cell(cell["model"], cell["task"], cell["method"], int(cell["r"]), cell.get("alpha")).key


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: Sequence[Row]) -> str:
    """One table per (model, task), methods side by side at each r, like the paper's tables."""
    out: list[str] = []
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.run, row.model, row.task), []).append(row)
    several_runs = len({row.run for row in rows}) > 1
    for (run, model, task), group in groups.items():
        metric = group[0].metric
        where = f" ({Path(run).name})" if several_runs else ""
        out.append(f"### {model} / {task}{where}\n")
        out.append(
            f"| method | r | {metric} | Δ vs baseline | GFLOPs/item | FLOPs ratio "
            "| items/s (this CPU) | throughput |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in group:
            out.append(
                f"| {row.label.split(' r=')[0]} | {row.r if row.method != 'baseline' else '-'} "
                f"| {row.value:.4f} | {_fmt(row.delta, '+.4f')} | {_fmt(row.gflops, '.2f')} "
                f"| {_fmt(row.flops_ratio, '.2f', 'x')} | {_fmt(row.items_per_s, '.1f')} "
                f"| {_fmt(row.speedup, '.2f', 'x')} |"
            )
        out.append("")
    out.append(
        "Throughput is the median of pairwise ratios against the unpatched model, "
        "timed interleaved in one process; items/s are this machine's."
    )
    return "\n".join(out)


def pareto_plot(rows: Sequence[Row], path: str | Path) -> Path:
    """Headline metric against throughput (x-factor), one panel per (model, task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.model, row.task), []).append(row)
    fig, axes = plt.subplots(
        1, max(len(groups), 1), figsize=(5 * max(len(groups), 1), 4), squeeze=False
    )
    styles = {
        "baseline": ("k", "*"),
        "redundancy": ("tab:blue", "o"),
        "semantics": ("tab:green", "s"),
        "turbo": ("tab:red", "D"),
    }
    for ax, ((model, task), group) in zip(axes[0], groups.items(), strict=False):
        series: dict[str, list[Row]] = {}
        for row in sorted(group, key=lambda r: METHOD_ORDER.get(r.method, 9)):
            series.setdefault(row.label.split(" r=")[0], []).append(row)
        palette = iter(["tab:red", "tab:orange", "tab:purple", "tab:brown"])
        for label, members in series.items():
            method = members[0].method
            points = sorted(
                (r.speedup if r.speedup is not None else 1.0, r.value, r.r) for r in members
            )
            color, marker = styles.get(method, ("gray", "x"))
            if method == "turbo":
                color = next(palette, color)
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker=marker,
                color=color,
                label=label,
                linestyle="-" if len(points) > 1 else "none",
                markersize=8,
            )
            for x, y, r in points:
                if method != "baseline":
                    ax.annotate(
                        f"r={r}",
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=color,
                    )
        ax.set_title(f"{model}\n{task}", fontsize=9)
        ax.set_xlabel("throughput vs baseline (x)")
        ax.set_ylabel(group[0].metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Write table.md, table.csv, table.json and pareto.png for ``results`` into ``out``."""
    rows = collect_rows(results)
    if not rows:
        raise ValueError(f"no finished cells in {list(map(str, results))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "table.md",
        "csv": out / "table.csv",
        "json": out / "table.json",
        "plot": out / "pareto.png",
    }
    paths["markdown"].write_text(markdown_table(rows) + "\n", encoding="utf-8")
    fields = [f.name for f in dataclasses.fields(Row)]
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r.as_dict() for r in rows)
    paths["json"].write_text(json.dumps([r.as_dict() for r in rows], indent=2), encoding="utf-8")
    pareto_plot(rows, paths["plot"])
    return paths
