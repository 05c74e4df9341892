"""``turbo-eval tune MODEL``: the fastest (r, alpha) whose quality loss stays within a tolerance.

The paper's "cap" table as a command. For each alpha (0 is redundancy-only, ToMe)
r rises through the grid until the quality loss on the calibration set exceeds the
tolerance (loss is assumed to grow with r, so the scan stops there); the feasible
settings are then timed together, interleaved with the unpatched model in one
process, and the one with the highest measured throughput is chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..methods import MethodSettings, method_overrides
from ..names import MODEL_TURBO_OPTIONS
from ..runner import (
    evaluate_method,
    load_suite_model,
    make_task,
    no_progress,
    profile_methods,
    time_methods,
)
from ..stats import paired_difference
from ..suite import Suite, SuiteError, find_suite, remote_code_problem

__all__ = [
    "Candidate",
    "Tolerance",
    "TuneResult",
    "format_tune",
    "main",
    "parse_tolerance",
    "search",
    "tune_model",
    "write_tune",
]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Allowed quality loss: ``relative`` (a share of the baseline) or absolute."""

    value: float
    relative: bool

    def allowed(self, baseline: float) -> float:
        """The largest loss in metric units for a baseline score."""
        return self.value * abs(baseline) if self.relative else self.value

    def __str__(self) -> str:
        return f"{100 * self.value:g}%" if self.relative else f"{self.value:g}"


def parse_tolerance(text: str) -> Tolerance:
    """``"1%"`` is 1 % of the baseline score; ``"0.01"`` is 0.01 in metric units."""
    raw = str(text).strip()
    relative = raw.endswith("%")
    try:
        number = float(raw[:-1] if relative else raw)
    except ValueError:
        raise ValueError(
            f"tolerance must be a number >= 0, optionally with %, got {text!r}"
        ) from None
    value = number / 100 if relative else number
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"tolerance must be a finite number >= 0, got {text!r}")
    return Tolerance(value, relative)


@dataclasses.dataclass
class Candidate:
    """One evaluated setting."""

    r: int
    alpha: float
    value: float
    loss: float
    feasible: bool
    loss_low: float | None = None
    loss_high: float | None = None
    flops_ratio: float | None = None
    speedup: float | None = None


@dataclasses.dataclass
class TuneResult:
    """Everything a tune run found; ``chosen`` is None when nothing is within tolerance."""

    metric: str
    baseline: float
    tolerance: str
    allowed_loss: float
    candidates: list[Candidate]
    chosen: Candidate | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: evaluate(r, alpha) -> (headline value, per-item scores or None)
Evaluate = Callable[[int, float], tuple[float, Sequence[float] | None]]
#: speed([(r, alpha), ...]) -> {(r, alpha): (flops_ratio, measured speedup)}
Speed = Callable[[list[tuple[int, float]]], dict[tuple[int, float], tuple[float, float]]]


def search(
    evaluate: Evaluate,
    speed: Speed,
    baseline: tuple[float, Sequence[float] | None],
    r_grid: Sequence[int],
    alphas: Sequence[float],
    tolerance: Tolerance,
) -> tuple[list[Candidate], Candidate | None]:
    """Scan r upwards per alpha until the loss passes the tolerance; time the feasible.

    Returns every evaluated candidate and the chosen one, or None: the r of the
    feasible setting with the highest measured speedup, and at that r (equal FLOPs,
    so speed differences there are noise) the alpha with the smallest loss.
    """
    if not r_grid or any(r < 1 for r in r_grid):
        raise ValueError(f"r_grid must hold ints >= 1, got {list(r_grid)}")
    if not alphas or any(a < 0 for a in alphas):
        raise ValueError(f"alphas must hold numbers >= 0, got {list(alphas)}")
    base_value, base_items = baseline
    allowed = tolerance.allowed(base_value)
    candidates: list[Candidate] = []
    for alpha in alphas:
        for r in sorted(set(r_grid)):
            value, items = evaluate(r, alpha)
            loss = base_value - value
            low = high = None
            if items is not None and base_items is not None and len(items) == len(base_items):
                interval = paired_difference(base_items, items)
                low, high = interval.low, interval.high
            # a loss equal to the tolerance is within it, whatever float rounding did
            within = loss <= allowed + 1e-12 * max(1.0, abs(base_value))
            candidate = Candidate(r, alpha, value, loss, within, low, high)
            candidates.append(candidate)
            if not candidate.feasible:
                break  # a larger r loses more: the rest of this alpha's grid is out
    feasible = [c for c in candidates if c.feasible]
    if feasible:
        timed = speed([(c.r, c.alpha) for c in feasible])
        for c in feasible:
            c.flops_ratio, c.speedup = timed[(c.r, c.alpha)]
    fastest = max(feasible, key=lambda c: (c.speedup or 0.0, -c.loss), default=None)
    if fastest is None:
        return candidates, None
    # settings at one r cost the same FLOPs, so their measured speeds differ by noise
    # only: the fastest r decides, and within it the smallest loss
    chosen = min((c for c in feasible if c.r == fastest.r), key=lambda c: (c.loss, -c.alpha))
    return candidates, chosen


def tune_model(
    model_name: str,
    suite: Suite,
    tolerance: Tolerance,
    task_name: str | None = None,
    r_grid: Sequence[int] | None = None,
    alphas: Sequence[float] | None = None,
    semantic_norm: str = "none",
    repeats: int | None = None,
    log: Callable[[str], None] = print,
    trust_remote_code: bool = False,
) -> TuneResult:
    """Tune ``model_name`` of ``suite`` on one of its tasks (the calibration set).

    The model is created under the suite's seed; a suite model with
    ``trust_remote_code = true`` is refused unless ``trust_remote_code`` is given.
    """
    problem = remote_code_problem(suite, trust_remote_code)
    if problem:
        raise ValueError(problem)

    specs = [m for m in suite.models if m.name == model_name]
    if not specs:
        raise ValueError(
            f"model {model_name!r} is not in the suite {suite.name!r}; its models: "
            f"{[m.name for m in suite.models]}"
        )
    spec = specs[0]
    tasks = [t for t in suite.tasks if t.model == model_name]
    if task_name is not None:
        tasks = [t for t in tasks if t.name == task_name]
    if not tasks:
        raise ValueError(f"task {task_name!r} is not a task of {model_name!r} in the suite")
    model = load_suite_model(suite, spec)
    task = make_task(suite, spec, tasks[0], model)
    facts = task.prepare(no_progress)
    log(f"[{model_name}/{task.name}] calibration: {facts}")
    settings = MethodSettings(
        alpha=suite.alpha,
        semantic_scale=suite.semantic_scale,
        fusion=suite.fusion,
        semantic_norm=semantic_norm,
    )
    extra = {k: spec.options[k] for k in MODEL_TURBO_OPTIONS if k in spec.options}

    def overrides(r: int, alpha: float) -> dict[str, Any]:
        """alpha 0 is redundancy-only (ToMe); any other alpha is Turbo's."""
        method = "redundancy" if alpha == 0 else "turbo"
        return {**(method_overrides(method, r, settings, alpha) or {}), **extra}

    def run(config: dict[str, Any] | None) -> tuple[float, Sequence[float] | None]:
        metrics = evaluate_method(model, task, config, suite.seed)
        items = (metrics.get("items") or {}).get(task.item_score)
        return float(metrics[task.metric]), items

    def evaluate(r: int, alpha: float) -> tuple[float, Sequence[float] | None]:
        value, items = run(overrides(r, alpha))
        log(f"  r={r:<3} alpha={alpha:<6g} {task.metric}={value:.4f}")
        return value, items

    def speed(grid: list[tuple[int, float]]) -> dict[tuple[int, float], tuple[float, float]]:
        items = list(task.speed_items())[: suite.throughput_batch]
        inputs = model.prepare(items)
        configs: dict[str, dict[str, Any] | None] = {"baseline": None}
        configs.update({f"{r}/{a:g}": overrides(r, a) for r, a in grid})
        flops = {key: row["flops"] for key, row in profile_methods(model, inputs, configs).items()}
        timing = time_methods(
            model, inputs, configs, len(items), repeats or suite.throughput_repeats, "baseline"
        )
        model.set_method(None)
        return {
            (r, a): (
                flops["baseline"] / flops[f"{r}/{a:g}"],
                timing["methods"][f"{r}/{a:g}"]["speedup"],
            )
            for r, a in grid
        }

    baseline = run(None)
    log(f"  baseline {task.metric}={baseline[0]:.4f}")
    candidates, chosen = search(
        evaluate,
        speed,
        baseline,
        r_grid if r_grid else spec.r,
        alphas if alphas is not None else (0.0, *suite.alpha),
        tolerance,
    )
    return TuneResult(
        task.metric, baseline[0], str(tolerance), tolerance.allowed(baseline[0]), candidates, chosen
    )


def format_tune(result: TuneResult) -> str:
    """The candidates as a Markdown table, then the chosen setting in one line."""
    lines = [
        f"baseline {result.metric} = {result.baseline:.4f}; tolerance {result.tolerance} "
        f"(a loss of at most {result.allowed_loss:.4f})",
        "",
        "| r | alpha | value | loss [95% CI] | within | FLOPs ratio | throughput |",
        "|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for c in result.candidates:
        interval = "" if c.loss_low is None else f" [{c.loss_low:+.4f}, {c.loss_high:+.4f}]"
        lines.append(
            f"| {c.r} | {c.alpha:g}{' (ToMe)' if c.alpha == 0 else ''} | {c.value:.4f} "
            f"| {c.loss:+.4f}{interval} | {'yes' if c.feasible else 'no'} "
            f"| {'-' if c.flops_ratio is None else f'{c.flops_ratio:.2f}x'} "
            f"| {'-' if c.speedup is None else f'{c.speedup:.2f}x'} |"
        )
    lines.append("")
    if result.chosen is None:
        lines.append("chosen: none - no setting stays within the tolerance; try smaller r")
    else:
        c = result.chosen
        lines.append(
            f"chosen: r={c.r} alpha={c.alpha:g}: {result.metric} {c.value:.4f} "
            f"(loss {c.loss:+.4f}), FLOPs ratio {c.flops_ratio:.2f}x, "
            f"measured throughput {c.speedup:.2f}x"
        )
    return "\n".join(lines)


def write_tune(result: TuneResult, out: str | Path, title: str) -> dict[str, Path]:
    """``tune.json``, ``tune.md`` and the frontier plot ``tune.png`` in the folder ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": folder / "tune.json",
        "markdown": folder / "tune.md",
        "plot": folder / "tune.png",
    }
    paths["json"].write_text(json.dumps(result.as_dict(), indent=2), encoding="utf-8")
    paths["markdown"].write_text(format_tune(result) + "\n", encoding="utf-8")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    try:
        for alpha in sorted({c.alpha for c in result.candidates}):
            points = sorted(
                (c.flops_ratio or 0.0, c.speedup or 0.0, c.value, c.r)
                for c in result.candidates
                if c.alpha == alpha and c.feasible
            )
            if points:
                ax.plot(
                    [p[1] for p in points],
                    [p[2] for p in points],
                    marker="o",
                    label=f"alpha={alpha:g}" + (" (ToMe)" if alpha == 0 else ""),
                )
                for _, x, y, r in points:
                    ax.annotate(
                        f"r={r}", (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7
                    )
        ax.axhline(
            result.baseline - result.allowed_loss, color="gray", linestyle="--", label="tolerance"
        )
        ax.plot([1.0], [result.baseline], "k*", markersize=10, label="baseline")
        if result.chosen is not None and result.chosen.speedup is not None:
            ax.plot(
                [result.chosen.speedup],
                [result.chosen.value],
                "o",
                markersize=14,
                markerfacecolor="none",
                color="tab:red",
                label="chosen",
            )
        ax.set_xlabel("measured throughput vs baseline (x)")
        ax.set_ylabel(result.metric)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(paths["plot"], dpi=120)
    finally:
        plt.close(fig)
    return paths


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``turbo-eval tune``: exit 0 with a chosen setting, 1 when none is within tolerance."""
    try:
        suite = find_suite(args.suite)
    except (SuiteError, FileNotFoundError) as error:
        parser.error(f"argument --suite: {error}")
    if args.r is not None and min(args.r) < 1:
        parser.error(f"argument --r: expected ints >= 1, got {args.r}")
    try:
        result = tune_model(
            args.model,
            suite,
            args.tolerance,
            task_name=args.task,
            r_grid=args.r,
            alphas=args.alpha,
            semantic_norm=args.semantic_norm,
            repeats=args.repeats,
            trust_remote_code=args.trust_remote_code,
        )
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out or Path("turbo-tune") / args.model.replace("/", "--"))
    paths = write_tune(result, out, f"{args.model}: tolerance {result.tolerance}")
    print()
    print(format_tune(result))
    for kind, path in paths.items():
        print(f"{kind:>8}: {path}")
    return 0 if result.chosen is not None else 1
