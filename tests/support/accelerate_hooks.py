"""accelerate hooks on a model, for tests that patch under them: which modules carry which
hook and forward, and a hook that counts the calls it sees."""

from __future__ import annotations

from typing import Any

from accelerate.hooks import ModelHook, add_hook_to_module
from torch import nn


class Counting(ModelHook):
    """Counts the forward calls of the modules it is added to."""

    def __init__(self) -> None:
        self.calls = 0

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return args, kwargs


def count_calls(modules: list[nn.Module]) -> Counting:
    """One :class:`Counting` appended to the hooks of every module of ``modules``."""
    counting = Counting()
    for module in modules:
        add_hook_to_module(module, counting, append=True)
    return counting


def hooks_of(model: nn.Module) -> dict[str, tuple[Any, Any]]:
    """Every hooked module's hook and its instance ``forward`` (accelerate's wrapper), by
    name: equal dicts (same objects) mean the hooks are as they were."""
    return {
        name: (module._hf_hook, module.__dict__.get("forward"))
        for name, module in model.named_modules()
        if hasattr(module, "_hf_hook")
    }
