"""``turbo-eval run [SUITE]``: a suite through the runner, then its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import distributed
from ..results import NotAResultsFolderError
from ..runner import run_suite
from ..suite import SuiteError, default_suite, find_suite, remote_code_problem
from .report import collect_rows, markdown_table, write_report

__all__ = ["main"]


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check the suite (and stop there with ``--validate-only``), run it, print the table.

    Returns 2 with a message naming the argument for a suite that cannot run.
    """
    if args.suite and args.suite_option:
        print("turbo-eval run: argument --suite: give the suite once", file=sys.stderr)
        return 2
    args.suite = args.suite or args.suite_option
    if args.quick and args.suite:
        print(
            f"turbo-eval run: argument --quick: selects the embedded quick suite, so it cannot "
            f"go with a suite file or name ({args.suite!r}): drop --quick, or run "
            "`turbo-eval run quick`",
            file=sys.stderr,
        )
        return 2
    try:
        suite = find_suite(args.suite) if args.suite else default_suite(quick=args.quick)
    except (SuiteError, FileNotFoundError) as error:
        print(f"turbo-eval run: argument suite: {error}", file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"{suite.source}: OK ({len(suite.models)} models, {len(suite.tasks)} tasks)")
        if suite.remote_code_models():
            allowed = "allowed by" if args.trust_remote_code else "runs only with"
            print(
                f"  trust_remote_code = true: {list(suite.remote_code_models())} (code from "
                f"their folders; {allowed} --trust-remote-code)"
            )
        return 0
    problem = remote_code_problem(suite, args.trust_remote_code)
    if problem:
        print(f"turbo-eval run: argument suite: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("turbo-results") / suite.name)
    try:
        store = run_suite(
            suite,
            out,
            quick=args.quick,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            trust_remote_code=args.trust_remote_code,
        )
    except NotAResultsFolderError as error:
        print(f"turbo-eval run: argument --overwrite: {error}", file=sys.stderr)
        return 2
    if not distributed.is_main():
        return 0
    paths = write_report([store.root], store.root)
    print()
    print(markdown_table(collect_rows([store.root])))
    print()
    for kind, path in paths.items():
        print(f"{kind:>8}: {path}")
    return 0
