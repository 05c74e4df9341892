"""Where a vision-language model reduces its image tokens: ``"tower"``, ``"connector"``, ``"llm"``.

Shared by the LLaVA and MiniGPT-v2 families. A :class:`VisionLanguagePatch` holds the
default modes (``patch.modes = "tower" | "connector" | "llm" | "both" | "none"``), the
LLM-mode settings (``patch.llm``) and the connector stage's (``patch.connector``); a call
selects its own with ``turbo_mode=...``, which :func:`mode_scope` pops from the call's
keyword arguments and makes active (per thread / context) for everything that call runs.
:func:`shrunk_generate` is the ``generate`` wrapper of every family that cuts the
prompt's image placeholders before generating (tower and connector modes).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ...compat import IncompatibleLibraryError
from ...connector import ConnectorReduction
from ...connector.size_bias import call_scope
from ...patch import TurboPatch
from .llm import LLMReduction

__all__ = [
    "MODES",
    "GenerateShrink",
    "VisionLanguagePatch",
    "mode_scope",
    "parse_modes",
    "shrunk_generate",
    "unscoped",
    "with_prompt",
]

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


#: a family's prompt cut for one ``generate`` call: the call's keyword arguments with the
#: image placeholders cut (``input_ids`` shortened), and a context the original
#: ``generate`` runs inside (Qwen's kept M-RoPE positions; a null context elsewhere)
GenerateShrink = Callable[
    [dict[str, Any]], tuple[dict[str, Any], contextlib.AbstractContextManager[Any]]
]


def shrunk_generate(
    patch: VisionLanguagePatch,
    original: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    shrink: GenerateShrink,
    stages: frozenset[str] = frozenset({"connector"}),
    check: Callable[[frozenset[str]], None] | None = None,
    media: tuple[str, ...] = ("pixel_values",),
) -> Any:
    """One ``generate`` call of a family that cuts the prompt before generating.

    Inside the call's :func:`mode_scope`: ``check(modes)`` (a family's own refusals),
    beam search refused in LLM mode, then, when one of ``stages`` is active and the call
    has one of the ``media`` arguments (``pixel_values``; Qwen adds its videos), the prompt (``input_ids`` given by position, as ``inputs`` or by
    name) goes through ``shrink`` and the original ``generate`` runs on the cut prompt
    (without ``position_ids``: they belong to the caller's prompt). Returns what the
    unpatched model would: the caller's full prompt followed by the new tokens.

    Raises:
        ValueError: ``num_beams > 1`` in LLM mode (its cache is not reordered), or what
            ``check`` and ``shrink`` raise.
    """
    with mode_scope(patch, kwargs) as modes:
        if check is not None:
            check(modes)
        if "llm" in modes and max(kwargs.get("num_beams", 1) or 1, 1) > 1:
            raise ValueError("llm mode supports num_beams=1 only (its cache is not reordered)")
        if not modes & stages or all(kwargs.get(name) is None for name in media):
            return original(*args, **kwargs)
        named = dict(kwargs)
        if args:
            named["input_ids"], args = args[0], args[1:]
        if named.get("inputs") is not None:
            named["input_ids"] = named.pop("inputs")
        prompt = named["input_ids"]
        named, scope = shrink(named)
        named.pop("position_ids", None)
        with scope:
            output = original(*args, **named)
        return with_prompt(output, prompt, named["input_ids"].shape[1])


def with_prompt(output: Any, prompt: torch.Tensor, short: int) -> Any:
    """Generated tokens after the caller's full ``prompt`` (as the unpatched model returns):
    ``output``'s sequences lose their first ``short`` columns (the cut prompt)."""

    def full(seq: torch.Tensor) -> torch.Tensor:
        repeat = seq.shape[0] // prompt.shape[0]
        return torch.cat([prompt.repeat_interleave(repeat, 0).to(seq.device), seq[:, short:]], 1)

    if isinstance(output, torch.Tensor):
        return full(output)
    output.sequences = full(output.sequences)
    return output


def unscoped(shrink: Callable[[dict[str, Any]], dict[str, Any]]) -> GenerateShrink:
    """A prompt cut whose ``generate`` needs no context of its own, as a
    :data:`GenerateShrink`."""
    return lambda named: (shrink(named), contextlib.nullcontext())
