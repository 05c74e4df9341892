"""Where a vision-language model reduces its image tokens: ``"tower"``, ``"connector"``, ``"llm"``.

Shared by the LLaVA and MiniGPT-v2 families. A :class:`VisionLanguagePatch` holds the
default modes (``patch.modes = "tower" | "connector" | "llm" | "both" | "none"``), the
LLM-mode settings (``patch.llm``) and the connector stage's (``patch.connector``); a call selects its own with ``turbo_mode=...``, which
:func:`mode_scope` pops from the call's keyword arguments and makes active (per
thread / context) for everything that call runs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from ...compat import IncompatibleLibraryError
from ...connector import ConnectorReduction
from ...connector.size_bias import call_scope
from ...patch import TurboPatch
from .llm import LLMReduction

__all__ = ["MODES", "VisionLanguagePatch", "mode_scope", "parse_modes"]

MODES = ("tower", "connector", "llm")
_ALIASES = {"both": ("tower", "llm"), "none": (), "off": ()}
_MODE: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar(
    "turbo_vlm_mode", default=None
)


def parse_modes(value: str | Iterable[str] | None) -> frozenset[str]:
    """``"tower"``, ``"connector"``, ``"llm"``, ``"both"``, ``"none"`` or an iterable -> a set."""
    if value is None:
        return frozenset()
    names = _ALIASES.get(value, (value,)) if isinstance(value, str) else tuple(value)
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise ValueError(
            f"turbo mode must be 'tower', 'connector', 'llm', 'both', 'none' or a set of {MODES}, "
            f"got {value!r}"
        )
    return frozenset(names)


class VisionLanguagePatch(TurboPatch):
    """A :class:`TurboPatch` with tower / LLM modes and the LLM-mode settings.

    Attributes:
        tower_available: whether tower mode can act (False e.g. for LLaVA-NeXT).
        tower_refusal: why not, for the error message.
        llm_refusal: the installed library lacks what LLM mode relies on (asking for
            ``"llm"`` raises this error); None when LLM mode can run.
        num_text_layers: decoder layers of the language model (K must be below).
        first_llm_layer: the lowest K LLM mode accepts (Qwen3-VL: its deepstack depth).
        connector_available: whether the connector stage can act (the family wired it).
        connector_refusal: why not, for the error message.
    """

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        super().__init__(model, adapter_name)
        self.tower_available = False
        self.tower_refusal = ""
        self.llm_refusal: IncompatibleLibraryError | None = None
        self.num_text_layers = 0
        self.first_llm_layer = 0
        self._modes: frozenset[str] = frozenset()
        self._llm = LLMReduction()
        self.connector_available = False
        self.connector_refusal = "this family has no connector stage"
        self._connector = ConnectorReduction()

    @property
    def modes(self) -> frozenset[str]:
        """The modes used when a call does not pass ``turbo_mode``."""
        return self._modes

    @modes.setter
    def modes(self, value: str | Iterable[str] | None) -> None:
        self._modes = self.check_modes(parse_modes(value))

    def check_modes(self, modes: frozenset[str]) -> frozenset[str]:
        """``modes`` if this model can run them, else a ValueError saying why not."""
        if "tower" in modes and not self.tower_available:
            raise ValueError(f"tower mode is not available: {self.tower_refusal}; use 'llm'")
        if "connector" in modes and not self.connector_available:
            raise ValueError(f"connector mode is not available: {self.connector_refusal}")
        if "llm" in modes and self.llm_refusal is not None:
            raise IncompatibleLibraryError(*self.llm_refusal.args)
        if "llm" in modes and self._llm.last_layer >= self.num_text_layers:
            raise ValueError(
                f"llm layer must be in [0, {self.num_text_layers - 1}], got {self._llm.last_layer}"
            )
        return modes

    @property
    def llm(self) -> LLMReduction:
        """LLM-mode settings (layer K, keep fraction, method, rank, alpha)."""
        return self._llm

    @llm.setter
    def llm(self, value: LLMReduction) -> None:
        if not isinstance(value, LLMReduction):
            raise TypeError(f"llm must be an LLMReduction, got {type(value).__name__}")
        if value.last_layer >= self.num_text_layers:
            raise ValueError(
                f"llm layer must be in [0, {self.num_text_layers - 1}], got {value.last_layer}"
            )
        self._llm = value

    @property
    def connector(self) -> ConnectorReduction:
        """Connector-stage settings (budget per image, method name)."""
        return self._connector

    @connector.setter
    def connector(self, value: ConnectorReduction) -> None:
        if not isinstance(value, ConnectorReduction):
            raise TypeError(f"connector must be a ConnectorReduction, got {type(value).__name__}")
        self._connector = value

    def active_modes(self) -> frozenset[str]:
        """The modes of the call being run (its ``turbo_mode``), else :attr:`modes`."""
        found = _MODE.get()
        return self._modes if found is None else found


@contextlib.contextmanager
def mode_scope(patch: VisionLanguagePatch, kwargs: dict[str, Any]) -> Iterator[frozenset[str]]:
    """Pop ``turbo_mode`` from a call's kwargs and make it the active mode inside (also the
    call's scope for the connector's ``log(size)`` bias)."""
    with call_scope():
        if "turbo_mode" in kwargs:
            modes = patch.check_modes(parse_modes(kwargs.pop("turbo_mode")))
            token = _MODE.set(modes)
            try:
                yield modes
            finally:
                _MODE.reset(token)
        else:
            yield patch.active_modes()
