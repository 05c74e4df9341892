"""What an adapter relies on in another library beyond its public API, checked at ``apply``.

Some adapters lean on behaviour a model library does not promise to keep: the keyword
arguments a decoder layer takes, where a KV cache travels, the outputs of a model's
feature method. Each such reliance is checked by feature detection (signatures and
attributes, never version strings) when ``apply`` runs; a missing feature raises
:class:`IncompatibleLibraryError`, which names the adapter, what it needs, the version
installed and the versions this release was tested with, instead of a shape error from
deep inside the other library.

``TESTED`` is the range the test suite ran on (lowest: the ``oldest`` tox environment;
newest: the ``newest`` one). It is updated together with the lock files
(``constraints/``) and README's table.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "TESTED",
    "IncompatibleLibraryError",
    "accepts",
    "installed_version",
    "require",
    "versions_tested",
]

# library -> (lowest, newest) version the test suite passed on
TESTED: dict[str, tuple[str, str]] = {
    "transformers": ("5.23.0", "5.25.0"),
    "diffusers": ("0.42.0", "0.42.1"),
    "timm": ("1.0.30", "1.0.31"),
    "accelerate": ("1.10.0", "1.16.0"),
    "peft": ("0.19.0", "0.21.2"),
}


class IncompatibleLibraryError(RuntimeError):
    """An adapter found a model library without a feature it relies on."""


def installed_version(library: str) -> str:
    """The installed distribution's version, or ``"not installed"``."""
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions_tested(library: str) -> str:
    """``"5.23.0 to 5.25.0"`` (or the one version) for a library in :data:`TESTED`."""
    low, high = TESTED.get(library, ("?", "?"))
    return low if low == high else f"{low} to {high}"


def require(adapter: str, library: str, found: bool, needs: str) -> None:
    """Raise :class:`IncompatibleLibraryError` unless ``found``.

    Args:
        adapter: the adapter (and mode) that relies on the feature, e.g. ``"llava (llm mode)"``.
        library: the distribution that should provide it, e.g. ``"transformers"``.
        found: whether feature detection found it.
        needs: what was looked for, in words a user can check.
    """
    if found:
        return
    raise IncompatibleLibraryError(
        f"{adapter} cannot patch this model: it needs {needs}, which {library} "
        f"{installed_version(library)} does not provide. This release of turbo-adapters was "
        f"tested with {library} {versions_tested(library)}; install a tested version "
        f"(pip install '{library}=={TESTED.get(library, ('', ''))[1]}') or a turbo-adapters "
        "release that supports yours"
    )


def accepts(function: Callable[..., Any], names: Iterable[str]) -> bool:
    """Whether ``function`` takes every one of ``names`` as a named parameter."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return all(
        name in parameters
        and parameters[name].kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        for name in names
    )
