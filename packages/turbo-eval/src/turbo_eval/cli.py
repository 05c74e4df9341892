"""``turbo-eval``: run suites, benchmark a model, analyse informativity, visualise merges, report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected ints >= 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbo-eval",
        description="Benchmark Turbo token reduction: quality against throughput, FLOPs, memory.",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite (the embedded default when none is given)")
    run.add_argument("suite", nargs="?", help="suite file (.toml/.yaml); default: embedded suite")
    run.add_argument("--quick", action="store_true", help="the small default suite (< 2 min)")
    run.add_argument("--out", default=None, help="results folder (default: turbo-results/NAME)")
    run.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--validate-only", action="store_true", help="check the suite file and stop")

    bench = sub.add_parser("bench", help="throughput, latency, FLOPs and memory over a sweep of r")
    bench.add_argument("model", help="model name (embedded, timm, local path)")
    bench.add_argument("--r", type=_int_list, default=[0, 4, 8, 16], help="comma-separated r")
    bench.add_argument("--batch", type=int, default=16)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--resolution", type=int, default=None)
    bench.add_argument("--alpha", type=float, default=5.0)
    bench.add_argument("--semantic-scale", type=float, default=30.0)
    bench.add_argument(
        "--modes",
        default="turbo,redundancy",
        help="comma-separated methods among turbo, redundancy, semantics",
    )
    bench.add_argument("--out", default=None, help="also write the figures as JSON here")

    analyze = sub.add_parser(
        "analyze", help="token redundancy and attention concentration per block (paper section 3.2)"
    )
    analyze.add_argument("model")
    analyze.add_argument("images", nargs="+", help="image files or folders")
    analyze.add_argument("--resolution", type=int, default=None)
    analyze.add_argument("--out", default="turbo-analysis")

    visualize = sub.add_parser("visualize", help="which patches merged with which, per block")
    visualize.add_argument("model")
    visualize.add_argument("image")
    visualize.add_argument("--r", type=int, default=16)
    visualize.add_argument("--alpha", type=float, default=5.0)
    visualize.add_argument("--semantic-scale", type=float, default=30.0)
    visualize.add_argument("--resolution", type=int, default=None)
    visualize.add_argument("--out", default="turbo-merges.png")

    report = sub.add_parser("report", help="combine results folders into tables and a plot")
    report.add_argument("results", nargs="+", help="results folders written by `run`")
    report.add_argument("--out", default=None, help="output folder (default: the first results)")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from .report import collect_rows, markdown_table, write_report
    from .runner import run_suite
    from .suite import SuiteError, default_suite, load_suite

    try:
        suite = load_suite(args.suite) if args.suite else default_suite(quick=args.quick)
    except (SuiteError, FileNotFoundError) as error:
        print(f"turbo-eval: {error}", file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"{suite.source}: OK ({len(suite.models)} models, {len(suite.tasks)} tasks)")
        return 0
    from . import distributed

    out = Path(args.out or Path("turbo-results") / suite.name)
    store = run_suite(
        suite,
        out,
        quick=args.quick and not args.suite,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    if not distributed.is_main():
        return 0
    paths = write_report([store.root], store.root)
    print()
    print(markdown_table(collect_rows([store.root])))
    print()
    for kind, path in paths.items():
        print(f"{kind:>8}: {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import collect_rows, markdown_table, write_report

    out = args.out or args.results[0]
    paths = write_report(args.results, out)
    print(markdown_table(collect_rows(args.results)))
    for kind, path in paths.items():
        print(f"{kind:>8}: {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_model, format_bench

    figures = bench_model(
        args.model,
        r_values=args.r,
        batch=args.batch,
        repeats=args.repeats,
        resolution=args.resolution,
        alpha=args.alpha,
        semantic_scale=args.semantic_scale,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
    )
    print(format_bench(figures))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze_model

    paths = analyze_model(args.model, args.images, out=args.out, resolution=args.resolution)
    for kind, path in paths.items():
        print(f"{kind:>8}: {path}")
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from .visualize import visualize_merges

    path = visualize_merges(
        args.model,
        args.image,
        out=args.out,
        r=args.r,
        alpha=args.alpha,
        semantic_scale=args.semantic_scale,
        resolution=args.resolution,
    )
    print(f"     png: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    commands = {
        "run": _cmd_run,
        "report": _cmd_report,
        "bench": _cmd_bench,
        "analyze": _cmd_analyze,
        "visualize": _cmd_visualize,
    }
    return commands[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
