"""A results folder: one JSON file per finished cell, so an interrupted run resumes.

Layout of ``OUT/``::

    run.json              suite (exact config), environment, start time
    cells/<key>.json      one finished (model, task, method, r) cell
    speed/<model>__<task>.json   interleaved throughput and FLOPs of every method
    table.md, table.csv, table.json, pareto.png   written by the report
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["ResultStore", "environment"]

_PACKAGES = (
    "torch",
    "turbo-core",
    "turbo-adapters",
    "turbo-eval",
    "transformers",
    "timm",
    "torchvision",
    "diffusers",
    "numpy",
    "scikit-learn",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    for cwd in (Path.cwd(), here):
        try:
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def environment(seed: int) -> dict[str, Any]:
    """What a result depends on besides the config: versions, threads, CPU, commit, seed."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "packages": versions,
        "git_commit": _git_commit(),
        "seed": seed,
    }


def _write_json(path: Path, data: Any) -> None:
    """Atomic write: a crash never leaves a half-written cell that would count as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


class ResultStore:
    """Reads and writes a results folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def write_run(self, data: dict[str, Any]) -> None:
        _write_json(self.root / "run.json", data)

    def read_run(self) -> dict[str, Any] | None:
        path = self.root / "run.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def has_cell(self, key: str) -> bool:
        return (self.root / "cells" / f"{key}.json").is_file()

    def write_cell(self, key: str, data: dict[str, Any]) -> None:
        _write_json(self.root / "cells" / f"{key}.json", data)

    def cells(self) -> list[dict[str, Any]]:
        folder = self.root / "cells"
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]

    def speed_path(self, model: str, task: str) -> Path:
        return self.root / "speed" / f"{model.replace('/', '--')}__{task}.json"

    def read_speed(self, model: str, task: str) -> dict[str, Any] | None:
        path = self.speed_path(model, task)
        return json.loads(path.read_text()) if path.is_file() else None

    def write_speed(self, model: str, task: str, data: dict[str, Any]) -> None:
        _write_json(self.speed_path(model, task), data)
