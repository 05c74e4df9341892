"""Paper-style tables (Markdown, CSV, JSON) with paired intervals, and the quality-against-FLOPs plot."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..names import METHOD_TABLE, method_kind, partner_method
from ..results import ResultStore

__all__ = ["Row", "collect_rows", "markdown_table", "pareto_plot", "write_report"]

METHOD_ORDER = {name: order for order, name in enumerate(METHOD_TABLE)}
_LAST = len(METHOD_ORDER)  # methods not listed sort after these


@dataclasses.dataclass
class Row:
    """One line of the table.

    ``delta*`` compare with the unpatched baseline, ``vs_tome*`` with redundancy-only
    (ToMe) at the same r, ``vs_intra*`` with the method's partner at the same r and
    alpha (cross-modal methods: the intra-modal method they match in FLOPs,
    ``turbo-cross`` with ``turbo``; size-bias methods: the same method without the bias,
    ``turbo-sizebias`` with ``turbo``; None for other methods): the paired mean
    difference of the per-item scores and its bootstrap 95 % interval (None without
    per-item results).
    """

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
    delta_low: float | None = None
    delta_high: float | None = None
    vs_tome: float | None = None
    vs_tome_low: float | None = None
    vs_tome_high: float | None = None
    speed_vs_tome: float | None = None
    n_items: int | None = None
    vs_intra: float | None = None
    vs_intra_low: float | None = None
    vs_intra_high: float | None = None
    #: throughput and speed-vs-ToMe ratios with their interval over rounds and noise flags
    #: (:class:`turbo_eval.noise.SpeedRatio` as a dict)
    speed: dict[str, Any] | None = None
    speed_vs_tome_figure: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def delta_resolved(self) -> bool:
        return _excludes_zero(self.delta_low, self.delta_high)

    @property
    def vs_tome_resolved(self) -> bool:
        return _excludes_zero(self.vs_tome_low, self.vs_tome_high)


def _excludes_zero(low: float | None, high: float | None) -> bool:
    return low is not None and high is not None and (low > 0 or high < 0)


def _item_scores(cell: dict[str, Any]) -> list[float] | None:
    items = cell.get("items") or {}
    column = cell.get("item_score")
    return items.get(column) if column else None


def _paired(
    a: dict[str, Any], b: dict[str, Any] | None, store: ResultStore
) -> tuple[float | None, float | None, float | None]:
    """Mean difference of ``a`` minus ``b`` per item, with its interval (or Nones).

    Raises:
        ValueError: both cells have per-item scores, but not as many (they were not
            computed on the same items; pairing them would be meaningless).
    """
    from ..stats import paired_difference

    if b is None:
        return None, None, None
    scores_a, scores_b = _item_scores(a), _item_scores(b)
    if scores_a and scores_b and len(scores_a) != len(scores_b):
        raise ValueError(
            f"{store.cell_path(_key(a))} has {len(scores_a)} items but the {b['method']} cell "
            f"it is paired with, {store.cell_path(_key(b))}, has {len(scores_b)}: they were "
            "not computed on the same items; delete the wrong cell and run the suite again"
        )
    if not scores_a or not scores_b or len(scores_a) < 2:
        return None, None, None
    interval = paired_difference(scores_a, scores_b)
    return interval.mean, interval.low, interval.high


def _speed_ratio(speed: dict[str, Any], key: str, other: str | None) -> float | None:
    """Median over the rounds of t_other / t_key, from the per-r interleaved group."""
    import statistics

    if other is None:
        return None
    for group in speed.get("timing", {}).get("groups", {}).values():
        methods = group.get("methods", {})
        if key in methods and other in methods:
            ratios = [
                o / t
                for o, t in zip(methods[other]["seconds"], methods[key]["seconds"], strict=True)
            ]
            return statistics.median(ratios)
    return None


def _speed_figure(
    speed: dict[str, Any],
    key: str,
    other: str | None,
    cpu_count: int | None = None,
    threads: int | None = None,
) -> dict[str, Any] | None:
    """t_other / t_key over the rounds of the group timing both, with its interval and noise
    flags (:func:`turbo_eval.noise.speed_ratio`); None when no group has both. ``threads``:
    the run's torch threads, for timings stored before the groups recorded them."""
    from ..noise import speed_ratio

    for group in speed.get("timing", {}).get("groups", {}).values():
        methods = group.get("methods", {})
        if other is not None and key != other and key in methods and other in methods:
            load = group.get("load") or {}
            return speed_ratio(
                methods[other]["seconds"],
                methods[key]["seconds"],
                load_before=load.get("before"),
                load_after=load.get("after"),
                own_threads=load.get("threads", threads),
                other_cores=load.get("other_cores"),
                cpu_count=cpu_count,
            ).as_dict()
    return None


def _environment(root: Path) -> dict[str, Any]:
    """The run's recorded environment (``run.json``), empty when there is none."""
    try:
        return dict(json.loads((root / "run.json").read_text()).get("environment") or {})
    except (OSError, ValueError):
        return {}


def collect_rows(results: Iterable[str | Path]) -> list[Row]:
    """Rows from one or more results folders (cells joined with their speed files)."""
    rows: list[Row] = []
    for root in results:
        store = ResultStore(root)
        if not (store.root / "cells").is_dir():
            raise FileNotFoundError(f"{root} is not a turbo-eval results folder (no cells/)")
        cells = store.cells()
        env = _environment(store.root)
        machine = {"cpu_count": env.get("cpu_count"), "threads": env.get("torch_threads")}
        baselines = {(c["model"], c["task"]): c for c in cells if c["method"] == "baseline"}
        tomes = {
            (c["model"], c["task"], int(c["r"])): c for c in cells if c["method"] == "redundancy"
        }
        by_method = {
            (c["model"], c["task"], c["method"], int(c["r"]), c.get("alpha")): c for c in cells
        }
        for cell in cells:
            speed = store.read_speed(cell["model"], cell["task"]) or {}
            flops = speed.get("flops_per_item", {})
            timing = speed.get("timing", {}).get("methods", {}).get(_key(cell), {})
            base_flops = next((v for k, v in flops.items() if "__baseline__" in k), None)
            own_flops = flops.get(_key(cell))
            value = float(cell["metrics"][cell["metric"]])
            base = baselines.get((cell["model"], cell["task"]))
            is_base = cell["method"] == "baseline"
            tome = tomes.get((cell["model"], cell["task"], int(cell["r"])))
            is_tome = cell["method"] == "redundancy"
            delta = _paired(cell, None if is_base else base, store)
            vs_tome = _paired(cell, None if is_base or is_tome else tome, store)
            intra = _partner(cell, by_method)
            vs_intra = _paired(cell, intra, store) if intra is not None else (None, None, None)
            scores = _item_scores(cell)
            rows.append(
                Row(
                    model=cell["model"],
                    task=cell["task"],
                    method=cell["method"],
                    label=cell["label"],
                    r=int(cell["r"]),
                    metric=cell["metric"],
                    value=value,
                    delta=(
                        delta[0]
                        if delta[0] is not None
                        else (None if base is None else value - base["metrics"][base["metric"]])
                    ),
                    gflops=None if own_flops is None else own_flops / 1e9,
                    flops_ratio=None if not (own_flops and base_flops) else base_flops / own_flops,
                    items_per_s=timing.get("items_per_s"),
                    speedup=timing.get("speedup"),
                    run=str(root),
                    delta_low=delta[1],
                    delta_high=delta[2],
                    vs_tome=vs_tome[0],
                    vs_tome_low=vs_tome[1],
                    vs_tome_high=vs_tome[2],
                    speed_vs_tome=None
                    if is_base or is_tome or tome is None
                    else _speed_ratio(speed, _key(cell), _key(tome)),
                    n_items=len(scores) if scores else None,
                    vs_intra=vs_intra[0],
                    vs_intra_low=vs_intra[1],
                    vs_intra_high=vs_intra[2],
                    speed=None
                    if is_base
                    else _speed_figure(
                        speed, _key(cell), speed.get("timing", {}).get("baseline"), **machine
                    ),
                    speed_vs_tome_figure=None
                    if is_base or is_tome or tome is None
                    else _speed_figure(speed, _key(cell), _key(tome), **machine),
                )
            )
    rows.sort(key=lambda r: (r.run, r.model, r.task, r.r, METHOD_ORDER.get(r.method, _LAST)))
    return rows


def _partner(
    cell: dict[str, Any], cells: dict[tuple[Any, ...], dict[str, Any]]
) -> dict[str, Any] | None:
    """The cell a cross-modal cell matches in FLOPs (its intra-modal method), or the one a
    size-bias cell differs from by the bias alone (None for other methods)."""
    method = partner_method(cell["method"])
    if method is None:
        return None
    return cells.get((cell["model"], cell["task"], method, int(cell["r"]), cell.get("alpha")))


def _key(cell: dict[str, Any]) -> str:
    from ..methods import Cell

    return Cell(cell["model"], cell["task"], cell["method"], int(cell["r"]), cell.get("alpha")).key


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _fmt_interval(mean: float | None, low: float | None, high: float | None) -> str:
    """``+0.42 [+0.10, +0.75]*`` in points (x100); * when the interval excludes 0."""
    if mean is None:
        return "-"
    if low is None or high is None:
        return f"{100 * mean:+.2f}"
    mark = "*" if _excludes_zero(low, high) else ""
    return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]{mark}"


def _speed_cell(figure: dict[str, Any] | None, median: float | None) -> str:
    """A ratio with its interval over rounds and ``!`` + reasons when it is noise."""
    from ..noise import format_ratio

    return format_ratio(figure) if figure is not None else _fmt(median, ".2f", "x")


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
        items = next((row.n_items for row in group if row.n_items), None)
        count = f", {items} paired items" if items else ""
        out.append(f"### {model} / {task}{where}{count}\n")
        # cross-modal and size-bias rows get one more column: their partner method
        header = _partner_header(group)
        partner = header is not None
        out.append(
            f"| method | r | {metric} | Δ vs baseline (pts) | Δ vs ToMe same r (pts) "
            "| FLOPs ratio | throughput | vs ToMe | items/s (this CPU) |"
            + (f" {header} |" if partner else "")
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if partner else ""))
        for row in group:
            extra = f" {_fmt_interval(row.vs_intra, row.vs_intra_low, row.vs_intra_high)} |"
            out.append(
                f"| {row.label.split(' r=')[0]} | {row.r if row.method != 'baseline' else '-'} "
                f"| {row.value:.4f} "
                f"| {'-' if row.method == 'baseline' else _fmt_interval(row.delta, row.delta_low, row.delta_high)} "
                f"| {_fmt_interval(row.vs_tome, row.vs_tome_low, row.vs_tome_high)} "
                f"| {_fmt(row.flops_ratio, '.2f', 'x')} "
                f"| {_speed_cell(row.speed, row.speedup)} "
                f"| {_speed_cell(row.speed_vs_tome_figure, row.speed_vs_tome)} "
                f"| {_fmt(row.items_per_s, '.1f')} |" + (extra if partner else "")
            )
        out.append("")
    out.append(
        "Δ: mean per-item difference in points (x100) of the metric, with its paired "
        "bootstrap 95 % interval (scipy, percentile, 4000 resamples of the items); * marks "
        "an interval that excludes 0. Methods at one r cost the same FLOPs (cross-modal "
        "ones by construction, to the counted FLOPs of their intra-modal method). Throughput: "
        "geometric mean of per-round ratios against the unpatched model (and against ToMe), "
        "timed interleaved per r in one process, with its paired bootstrap 95 % interval "
        "over rounds; ! marks a ratio that is noise (rounds disagree by more than 15 %, or "
        "the 1-minute load average moved by more than 1.0 or exceeded the CPU count, "
        "turbo_eval.noise); items/s are this machine's. Partner column: a "
        "cross-modal row against its intra-modal method at equal FLOPs, a size-bias row "
        "(log(size) in the cross-attentions over merged image tokens) against the same "
        "method without it, both at the same r and alpha."
    )
    return "\n".join(out)


def _partner_header(group: Sequence[Row]) -> str | None:
    """The partner column's title for a table's rows (None: no row has a partner)."""
    kinds = {method_kind(row.method) for row in group}
    cross, bias = "cross" in kinds, "sizebias" in kinds
    if cross and bias:
        return "Δ vs partner same r (pts)"
    if cross:
        return "Δ vs intra-modal same r (pts)"
    if bias:
        return "Δ vs no size bias same r (pts)"
    return None


STYLES = {name: info.style for name, info in METHOD_TABLE.items()}


def pareto_plot(rows: Sequence[Row], path: str | Path) -> Path:
    """Headline metric against the FLOPs ratio, one panel per (model, task).

    Error bars are the paired 95 % intervals of the difference to the baseline;
    methods at one r share an x (equal FLOPs) and are drawn slightly apart; each
    point is labelled with r and its measured throughput.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.model, row.task), []).append(row)
    fig, axes = plt.subplots(
        1, max(len(groups), 1), figsize=(5.5 * max(len(groups), 1), 4.2), squeeze=False
    )
    for ax, ((model, task), group) in zip(axes[0], groups.items(), strict=False):
        series: dict[str, list[Row]] = {}
        for row in sorted(group, key=lambda r: METHOD_ORDER.get(r.method, _LAST)):
            series.setdefault(row.label.split(" r=")[0], []).append(row)
        palette = iter(["tab:red", "tab:orange", "tab:purple", "tab:brown"])
        for offset, (label, members) in enumerate(series.items()):
            method = members[0].method
            color, marker = STYLES.get(method, ("gray", "x"))
            if method == "turbo":
                color = next(palette, color)
            members = sorted(members, key=lambda r: r.flops_ratio or 1.0)
            # equal-FLOPs methods share an x: nudge each series so the bars stay apart
            xs = [(r.flops_ratio or 1.0) * (1 + 0.008 * (offset - 2)) for r in members]
            ys = [r.value for r in members]
            low = [
                0.0 if r.delta_low is None or r.delta is None else r.delta - r.delta_low
                for r in members
            ]
            high = [
                0.0 if r.delta_high is None or r.delta is None else r.delta_high - r.delta
                for r in members
            ]
            ax.errorbar(
                xs,
                ys,
                yerr=[low, high],
                marker=marker,
                color=color,
                label=label,
                linestyle="-" if len(members) > 1 else "none",
                markersize=7,
                capsize=3,
            )
            for x, row in zip(xs, members, strict=True):
                if method != "baseline":
                    speed = "" if row.speedup is None else f", {row.speedup:.2f}x"
                    ax.annotate(
                        f"r={row.r}{speed}",
                        (x, row.value),
                        textcoords="offset points",
                        xytext=(5, -10 if offset % 2 else 4),
                        fontsize=6,
                        color=color,
                    )
        ax.set_title(f"{model}\n{task}", fontsize=9)
        ax.set_xlabel("FLOPs ratio (baseline / method); labels: measured throughput")
        ax.set_ylabel(f"{group[0].metric} (bars: paired 95 % CI vs baseline)")
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


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``turbo-eval report``: the table, then the paths written."""
    out = args.out or args.results[0]
    try:
        paths = write_report(args.results, out)
    except (FileNotFoundError, ValueError) as error:  # not a results folder, or empty
        parser.error(f"argument results: {error}")
    print(markdown_table(collect_rows(args.results)))
    for kind, path in paths.items():
        print(f"{kind:>8}: {path}")
    return 0
