"""MiniGPT-v2 (:class:`turbo_adapters.models.MiniGPTv2`): Turbo in the EVA ViT-g tower.

The tower is timm's ``Eva``, patched by the timm-eva family (CLS guidance, CLS
protected). MiniGPT-v2 concatenates every 4 consecutive patch tokens after dropping
CLS, so the site carries ``CountRule(multiple_of=4, offset=1)``: any ``r`` is
accepted and the core lowers the last blocks' r until ``count - 1`` is a multiple of
4 (never padding with fake tokens). The schedule actually used, and what was
adjusted, is on ``patch.last_state.resolved`` (``adjusted``, ``unadjusted``,
``meets_rule``).
"""

from __future__ import annotations

from torch import nn

from turbo_core import CountRule, TurboConfig

from ..adapter import FamilyAdapter
from ..patch import TurboPatch
from .timm_eva import TimmEvaAdapter

__all__ = ["CONCAT_RULE", "MiniGPTv2Adapter"]

#: 1 CLS + a multiple of 4 patch tokens reach the concatenation.
CONCAT_RULE = CountRule(multiple_of=4, offset=1)


class MiniGPTv2Adapter(FamilyAdapter):
    """``turbo_adapters.models.MiniGPTv2``: the EVA tower with the multiple-of-4 rule."""

    name = "minigpt-v2"
    model_names = ("minigpt-v2*", "minigptv2*", "vision-cair/minigpt*")
    model_classes = ("turbo_adapters.models.minigpt", "MiniGPTv2")

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        group = int(model.config.concat)  # type: ignore[union-attr]
        TimmEvaAdapter().install(patch, model.visual_encoder, config)  # type: ignore[arg-type]
        patch.site.rule = CountRule(multiple_of=group, offset=1)
