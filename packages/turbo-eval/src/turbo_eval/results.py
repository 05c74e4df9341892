"""A results folder: one JSON file per finished cell, so an interrupted run resumes.

Layout of ``OUT/``::

    .turbo-eval-results   the marker: turbo-eval made this folder (``--overwrite`` needs it)
    run.json              suite (exact config), environment, start time, weights' checksums
    cells/<key>.json      one finished (model, task, method, r) cell
    speed/<model>__<task>.json   interleaved throughput and FLOPs of every method
    table.md, table.csv, table.json, pareto.png   written by the report

Every file is written inside this folder (resolved paths are checked), and
:meth:`ResultStore.clear` deletes only this layout, in a folder holding the marker.
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

__all__ = [
    "MARKER",
    "CorruptResultError",
    "NotAResultsFolderError",
    "ResultStore",
    "environment",
]

#: The file that marks a folder as made by turbo-eval.
MARKER = ".turbo-eval-results"
#: Files a results folder may hold at its top, and its two folders of JSON files.
_TOP_FILES = (MARKER, "run.json", "table.md", "table.csv", "table.json", "pareto.png")
_FOLDERS = ("cells", "speed")
#: Keys without which a file cannot be used (``{}`` is as broken as a truncated file).
_CELL_KEYS = ("model", "task", "method", "r", "label", "metric", "metrics")
_SPEED_KEYS = ("flops_per_item", "timing")
_RUN_KEYS = ("suite",)


class CorruptResultError(ValueError):
    """A results file that is not valid JSON, not an object, or lacks keys; names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: {reason}")


class NotAResultsFolderError(ValueError):
    """A folder that ``--overwrite`` must not delete: not made by turbo-eval, or holding
    files turbo-eval did not write."""


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


def _read_json(path: Path, required: tuple[str, ...]) -> dict[str, Any] | None:
    """The JSON object in ``path`` (None when there is no file).

    Raises:
        CorruptResultError: truncated, empty, not an object, or without ``required`` keys.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptResultError(path, f"not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CorruptResultError(path, f"not a JSON object (a {type(data).__name__})")
    missing = [key for key in required if key not in data]
    if missing:
        raise CorruptResultError(path, f"lacks {missing}")
    return data


def _is_leftover(name: str) -> bool:
    """A temporary file of :func:`_write_json` that a killed process left behind."""
    return name.startswith("tmp") and name.endswith(".tmp")


class ResultStore:
    """Reads and writes a results folder (nothing outside it)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _file(self, folder: str, name: str) -> Path:
        """``root/folder/name``, refused unless it resolves to a file directly in that folder
        (a key or task name such as ``../../x`` must not write elsewhere)."""
        path = self.root / folder / name if folder else self.root / name
        expected = (self.root / folder).resolve() if folder else self.root.resolve()
        separators = any(sep in name for sep in ("/", "\\", os.sep))
        if separators or path.resolve().parent != expected:
            raise ValueError(
                f"{name!r} is not a plain file name in the results folder's {folder or '.'}/ "
                f"({expected}): it resolves to {path.resolve()}"
            )
        return path

    # ------------------------------------------------------------ run metadata
    def write_run(self, data: dict[str, Any]) -> None:
        """Write ``run.json`` (and the marker that lets ``--overwrite`` remove the folder)."""
        marker = self._file("", MARKER)
        if not marker.is_file():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(
                "Written by turbo-eval: `turbo-eval run --overwrite` may delete this folder.\n",
                encoding="utf-8",
            )
        _write_json(self._file("", "run.json"), data)

    def read_run(self) -> dict[str, Any] | None:
        """``run.json`` (None before the first run).

        Raises:
            CorruptResultError: the file is unreadable; it cannot be recomputed.
        """
        try:
            return _read_json(self._file("", "run.json"), _RUN_KEYS)
        except CorruptResultError as error:
            raise CorruptResultError(
                error.path,
                f"{str(error).removeprefix(f'{error.path}: ')}; the run's metadata cannot be "
                "recomputed: restore it, choose another --out, or start afresh with --overwrite",
            ) from None

    # ------------------------------------------------------------------- cells
    def cell_path(self, key: str) -> Path:
        return self._file("cells", f"{key}.json")

    def read_cell(self, key: str) -> dict[str, Any] | None:
        """A finished cell (None when not computed yet).

        Raises:
            CorruptResultError: the file is truncated, empty or lacks a cell's keys.
        """
        return _read_json(self.cell_path(key), _CELL_KEYS)

    def has_cell(self, key: str) -> bool:
        """Whether the cell is finished (a corrupt file is not)."""
        try:
            return self.read_cell(key) is not None
        except CorruptResultError:
            return False

    def write_cell(self, key: str, data: dict[str, Any]) -> None:
        _write_json(self.cell_path(key), data)

    def cells(self) -> list[dict[str, Any]]:
        """Every finished cell.

        Raises:
            CorruptResultError: a cell file is unreadable (named).
        """
        folder = self.root / "cells"
        return [_read_json(p, _CELL_KEYS) for p in sorted(folder.glob("*.json"))]  # type: ignore[misc]

    # ------------------------------------------------------------------- speed
    def speed_path(self, model: str, task: str) -> Path:
        return self._file("speed", f"{model.replace('/', '--')}__{task}.json")

    def read_speed(self, model: str, task: str) -> dict[str, Any] | None:
        """Speed figures of a (model, task) (None when not measured yet).

        Raises:
            CorruptResultError: the file is unreadable (named).
        """
        return _read_json(self.speed_path(model, task), _SPEED_KEYS)

    def write_speed(self, model: str, task: str, data: dict[str, Any]) -> None:
        _write_json(self.speed_path(model, task), data)

    # ---------------------------------------------------------------- removal
    def foreign_entries(self) -> list[Path]:
        """What the folder holds besides the results layout (symlinks count as foreign)."""
        foreign = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink():
                foreign.append(entry)
            elif entry.name in _FOLDERS and entry.is_dir():
                foreign += [
                    p
                    for p in sorted(entry.iterdir())
                    if p.is_symlink()
                    or not p.is_file()
                    or not (p.suffix == ".json" or _is_leftover(p.name))
                ]
            elif not entry.is_file() or not (entry.name in _TOP_FILES or _is_leftover(entry.name)):
                foreign.append(entry)
        return foreign

    def clear(self) -> str:
        """Delete the results folder, file by file, and say what was removed.

        Only a folder with the marker whose every entry belongs to the layout is touched.

        Raises:
            NotAResultsFolderError: no marker, or entries turbo-eval did not write (listed).
        """
        if not self.root.exists():
            return f"nothing to remove: {self.root} does not exist"
        if self.root.is_symlink() or not (self.root / MARKER).is_file():
            raise NotAResultsFolderError(
                f"{self.root} is not a results folder made by turbo-eval (no {MARKER} "
                "marker): --overwrite deletes only those; choose another --out, or remove "
                "the folder yourself"
            )
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(str(p) for p in foreign[:10]) + (" ..." if len(foreign) > 10 else "")
            raise NotAResultsFolderError(
                f"{self.root} holds {len(foreign)} entries turbo-eval did not write ({shown}): "
                "--overwrite removes nothing there; move them out, or choose another --out"
            )
        counts: dict[str, int] = {}
        for folder in _FOLDERS:
            path = self.root / folder
            if path.is_dir():
                files = sorted(path.iterdir())
                for file in files:
                    file.unlink()
                path.rmdir()
                counts[folder] = sum(file.suffix == ".json" for file in files)
        top = [name for name in _TOP_FILES if (self.root / name).is_file()]
        leftovers = [p for p in self.root.iterdir() if _is_leftover(p.name)]
        for path in [self.root / name for name in top] + leftovers:
            path.unlink()
        self.root.rmdir()
        listed = [f"{counts.get('cells', 0)} cells", f"{counts.get('speed', 0)} speed files"]
        return f"removed {self.root}: {', '.join(listed + [n for n in top if n != MARKER])}"
