"""Every per-item fidelity column of a size-bias run: ``<m>-sizebias`` against ``<m>``.

The run's table (``table.md``) pairs the headline metric only; this prints each column
the task keeps per item (captions: ``token_agreement``, ``caption_kl``,
``caption_match``; VQA: ``answer_match``, ``first_token_kl``; retrieval:
``itm_spearman``, ``itm_top1_agreement``, ``itc_spearman``) for both methods at every r,
with the paired difference and its bootstrap 95 % interval (``turbo_eval.stats``).

Usage: python benchmarks/size_bias/summary.py RESULTS [RESULTS ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from turbo_eval.stats import paired_difference


def summarise(root: Path) -> list[str]:
    cells = [json.loads(p.read_text()) for p in sorted((root / "cells").glob("*.json"))]
    by_key = {(c["task"], c["method"], int(c["r"]), c.get("alpha")): c for c in cells}
    lines = []
    for (task, method, r, alpha), biased in sorted(by_key.items(), key=str):
        if not method.endswith("-sizebias"):
            continue
        plain = by_key.get((task, method.removesuffix("-sizebias"), r, alpha))
        if plain is None:
            continue
        lines.append(f"{biased['model']} / {task}, r={r}: {method} vs {plain['method']}")
        for column, values in biased["items"].items():
            other = plain["items"].get(column)
            numbers = all(isinstance(v, (int, float)) for v in values + (other or []))
            if not other or len(other) != len(values) or len(values) < 2 or not numbers:
                continue
            d = paired_difference(values, other)
            mark = "*" if d.excludes_zero else " "
            lines.append(
                f"  {column:<20} off {np.mean(other):8.4f}  on {np.mean(values):8.4f}  "
                f"on-off {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{mark}  n={d.n}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="turbo-eval results folders")
    for root in parser.parse_args().results:
        print("\n".join(summarise(root)))


if __name__ == "__main__":
    main()
