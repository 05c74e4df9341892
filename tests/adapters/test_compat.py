"""turbo_adapters.compat: the tested range and the refusal when a library lacks a feature.

The tested range is written in three places that must agree: ``compat.TESTED`` (what the
error message quotes), README's table, and the lock files (``constraints/oldest.txt`` at the
lowest, ``constraints/adapters.txt`` inside the range).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.version import Version

from turbo_adapters.compat import (
    TESTED,
    IncompatibleLibraryError,
    accepts,
    installed_version,
    require,
    versions_tested,
)

ROOT = Path(__file__).resolve().parents[2]


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, names lower-cased."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            found[match[1].lower()] = match[2]
    return found


def test_lowest_tested_is_what_the_oldest_environment_installs() -> None:
    oldest = pins(ROOT / "constraints" / "oldest.txt")
    assert {name: oldest.get(name) for name in TESTED} == {
        name: low for name, (low, _) in TESTED.items()
    }


def test_the_lock_lies_inside_the_tested_range() -> None:
    lock = pins(ROOT / "constraints" / "adapters.txt")
    for name, (low, high) in TESTED.items():
        assert Version(low) <= Version(lock[name]) <= Version(high), name


def test_readme_table_states_the_tested_range() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, (low, high) in TESTED.items():
        assert re.search(
            rf"^\| {name} \| {re.escape(low)} \| {re.escape(high)} \|$", readme, re.M
        ), name


def test_declared_lower_bounds_are_the_lowest_tested() -> None:
    declared = (ROOT / "packages" / "turbo-adapters" / "pyproject.toml").read_text()
    for name in ("transformers", "timm", "peft"):
        bounds = set(re.findall(rf'"{name}>=([0-9.]+)"', declared))
        assert bounds == {TESTED[name][0].removesuffix(".0")}, (name, bounds)


def test_require_names_adapter_feature_installed_and_tested_versions() -> None:
    require("demo", "transformers", True, "anything")  # found: no error
    with pytest.raises(IncompatibleLibraryError) as raised:
        require("demo (llm mode)", "transformers", False, "a decoder that takes masks")
    message = str(raised.value)
    assert message.startswith("demo (llm mode) cannot patch this model: it needs a decoder")
    assert f"transformers {installed_version('transformers')} does not provide" in message
    assert f"tested with transformers {versions_tested('transformers')}" in message
    assert installed_version("no-such-distribution-xyz") == "not installed"


def test_accepts_reads_named_parameters_only() -> None:
    def layer(hidden, attention_mask=None, *, position_embeddings=None, **kwargs):
        return hidden

    def renamed(hidden, *args, **kwargs):
        return hidden

    assert accepts(layer, ("attention_mask", "position_embeddings"))
    assert not accepts(renamed, ("attention_mask",))  # **kwargs would swallow it silently
    assert not accepts(len, ("attention_mask",))  # a builtin without a signature
