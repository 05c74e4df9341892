"""``--device`` and ``--dtype`` for every benchmark: CPU and float32 unless asked.

``python benchmarks/<name>.py --device cuda --dtype bfloat16`` runs the same measurement on
a GPU in bfloat16: models and floating inputs move there (integer inputs such as token ids
keep their dtype), and timings synchronise the device before reading the clock.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["Target", "add_target_arguments", "target"]


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a benchmark runs: a device and the floating dtype of models and inputs."""

    device: torch.device
    dtype: torch.dtype

    def to(self, value: Any) -> Any:
        """``value`` (a module, tensor, or a list / tuple / dict of them) on this target."""
        if isinstance(value, nn.Module):
            return value.to(self.device, self.dtype)
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                return value.to(self.device, self.dtype)
            return value.to(self.device)
        if isinstance(value, (list, tuple)):
            return type(value)(self.to(v) for v in value)
        if isinstance(value, dict):
            return {k: self.to(v) for k, v in value.items()}
        return value

    def attach(self, module: nn.Module) -> nn.Module:
        """``module`` on this target, moving its call's inputs here too (for models whose
        inputs are prepared on the CPU by code the benchmark does not own)."""

        def move(_: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
            return self.to(args), self.to(kwargs)

        module.register_forward_pre_hook(move, with_kwargs=True)
        return self.to(module)  # type: ignore[no-any-return]

    @property
    def synchronize(self) -> Callable[[], Any] | None:
        """What waits for the device's queued work (None on CPU)."""
        if self.device.type == "cuda":
            return lambda: torch.cuda.synchronize(self.device)
        return None

    def __str__(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')}"


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cpu", help="torch device (default %(default)s; e.g. cuda, cuda:1)"
    )
    parser.add_argument(
        "--dtype", default="float32", help="floating dtype (default %(default)s; e.g. bfloat16)"
    )


def target(args: argparse.Namespace) -> Target:
    """The target of the parsed ``--device`` / ``--dtype``; a bad value names the option."""
    found = getattr(torch, args.dtype, None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise SystemExit(
            f"--dtype must name a floating torch dtype (float32, bfloat16, float16), "
            f"got {args.dtype!r}"
        )
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise SystemExit(f"--device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    return Target(device, found)
