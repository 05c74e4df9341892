"""``turbo-eval methods``: every method, the stages it runs at and the families offering it."""

from __future__ import annotations

import argparse
import textwrap

from ..names import METHOD_TABLE

__all__ = ["format_methods", "main"]


def format_methods(width: int = 100) -> str:
    """The methods by stage (from the adapters' declarations), then the suites' names."""
    from turbo_adapters.method_support import method_support

    lines = ["Methods by stage (turbo_adapters.apply / apply_vlm_method names):", ""]
    for row in method_support():
        head = f"  {row.method:<12} {row.stage:<10} "
        families = ", ".join(
            f"{name} ({row.limits[name]})" if name in row.limits else name for name in row.families
        )
        lines += textwrap.wrap(
            families or "(no registered family)",
            width=width,
            initial_indent=head,
            subsequent_indent=" " * len(head),
            break_on_hyphens=False,
        )
        for name, why in row.refused.items():
            lines.append(f"{' ' * len(head)}refused by {name}: {why}")
    lines += ["", "Suite methods (turbo-eval suites and reports):", ""]
    for info in METHOD_TABLE.values():
        lines.append(f"  {info.name:<16} {info.kind:<9} {info.label}")
    return "\n".join(lines)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Print :func:`format_methods`."""
    print(format_methods())
    return 0
