"""Weight-only quantization of a vision encoder before Turbo: torchao or optimum-quanto.

Turbo's attention path calls the projection modules, so it works with whatever
Linear class holds the weights: torchao keeps ``nn.Linear`` with an int8 tensor
subclass weight, quanto swaps in its ``QLinear``. GPTQ for language models is in
:mod:`.gptq` (its own environment).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

__all__ = ["BACKENDS", "quantize_weights"]

#: backend -> weight types it offers here.
BACKENDS = {"torchao": ("int8",), "quanto": ("int8", "int4")}


def _filter(skip: Iterable[str]) -> Callable[[nn.Module, str], bool]:
    skipped = tuple(skip)

    def wanted(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and not any(
            name == s or name.startswith(f"{s}.") for s in skipped
        )

    return wanted


def quantize_weights(
    model: nn.Module,
    backend: str = "torchao",
    weights: str = "int8",
    *,
    skip: Iterable[str] = (),
) -> nn.Module:
    """Quantize every ``nn.Linear`` weight of ``model`` in place (activations stay float).

    Args:
        backend: ``"torchao"`` (``Int8WeightOnlyConfig``) or ``"quanto"``.
        weights: ``"int8"``, or ``"int4"`` with quanto.
        skip: module names (and their children) left in float, e.g. ``["head"]``.

    Returns:
        ``model``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if weights not in BACKENDS[backend]:
        raise ValueError(
            f"weights must be one of {BACKENDS[backend]} for {backend}, got {weights!r}"
        )
    wanted = _filter(skip)
    if backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=wanted)
        return model
    from optimum.quanto import freeze, qint4, qint8, quantize

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not wanted(m, n)]
    quantize(model, weights={"int8": qint8, "int4": qint4}[weights], exclude=names or None)
    freeze(model)
    return model
