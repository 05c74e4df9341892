"""The tower family written in docs/custom-models.md, executed from the page itself.

The page's block is the test's source, so the documented example cannot drift from
working code: :func:`docs_family` runs it (which registers its adapter) once per session.
"""

from __future__ import annotations

import functools
import re
import types
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "custom-models.md"
MARKER = "<!-- docs-example: vit-msn -->"


def example_source() -> str:
    """The python block right after the page's marker."""
    text = PAGE.read_text(encoding="utf-8")
    after = text.split(MARKER, 1)[1]
    found = re.match(r"\s*```python\n(.*?)\n```", after, re.DOTALL)
    if found is None:
        raise AssertionError(f"no python block after {MARKER!r} in {PAGE}")
    return found.group(1)


@functools.cache
def docs_family() -> types.ModuleType:
    """The example as a module (its adapter registered as ``hf-vit-msn``)."""
    module = types.ModuleType("turbo_docs_example_vit_msn")
    exec(compile(example_source(), str(PAGE), "exec"), module.__dict__)
    return module
