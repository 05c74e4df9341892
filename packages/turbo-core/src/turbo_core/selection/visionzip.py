"""VisionZip (Yang et al., CVPR 2025): dominant tokens by the guide, a few contextual merges."""

from __future__ import annotations

import dataclasses

import torch

from .._checks import check_float, check_int
from ..connector import ConnectorInputs, ReducedTokens
from ._common import check_inputs, gather_tokens, keep_all, normalized, work_float

__all__ = ["VisionZip"]

#: VisionZip's published splits keep 10 contextual tokens per 64 (54+10, 108+20, 162+30).
DEFAULT_CONTEXTUAL_SHARE = 10 / 64


@dataclasses.dataclass(frozen=True)
class VisionZip:
    """VisionZip's selection on each image's tokens, written from the public algorithm.

    1. Dominant tokens: the ``budget - contextual`` tokens the guide attends to most
       (VisionZip uses the CLS attention at the tower's second-to-last layer).
    2. Contextual tokens: of the remaining M tokens (in order), every
       ``max(1, M // contextual)``-th one is a target (the first ``contextual``); each other
       remaining token joins the target most similar to it by cosine of ``inputs.keys``
       (the same layer's keys, mean over heads), or of the features without keys.

    VisionZip's contextual token is ``target + mean(tokens that joined it)`` (its released
    code; ``contextual_merge="reference"``, the default, reproduces it);
    ``contextual_merge="mean"`` takes the size-weighted mean of the target and its tokens
    instead. Output tokens are in ascending order of position; a contextual token takes its
    target's position, its size is 1 + the tokens that joined it.

    Args:
        contextual: contextual tokens per image (int, at most the budget); ``None`` means
            ``round(budget * contextual_share)``.
        contextual_share: share of the budget spent on contextual tokens when
            ``contextual`` is None, in [0, 1].
        contextual_merge: ``"reference"`` or ``"mean"``, see above.
    """

    contextual: int | None = None
    contextual_share: float = DEFAULT_CONTEXTUAL_SHARE
    contextual_merge: str = "reference"

    def __post_init__(self) -> None:
        if self.contextual is not None:
            object.__setattr__(self, "contextual", check_int(self.contextual, "contextual", 0))
        share = check_float(self.contextual_share, "contextual_share", 0.0, 1.0)
        object.__setattr__(self, "contextual_share", share)
        if self.contextual_merge not in ("reference", "mean"):
            raise ValueError(
                f"contextual_merge must be 'reference' or 'mean', got {self.contextual_merge!r}"
            )

    def split(self, budget: int) -> tuple[int, int]:
        """``(dominant, contextual)`` token counts for ``budget`` tokens kept."""
        if self.contextual is None:
            contextual = int(budget * self.contextual_share + 0.5)
        else:
            contextual = self.contextual
            if contextual > budget:
                raise ValueError(f"contextual must be <= the budget ({budget}), got {contextual}")
        return budget - contextual, contextual

    def __call__(self, inputs: ConnectorInputs, budget: int) -> ReducedTokens:
        batch, count, kept = check_inputs(inputs, budget, "visionzip")
        if inputs.guide is None:
            raise ValueError(
                "visionzip needs a guide: inputs.guide (B, N), the attention that picks the "
                "dominant tokens (CLS attention, a pooling probe's, or the prompt's)"
            )
        if kept == count:
            return keep_all(inputs)
        dominant, contextual = self.split(kept)
        device = inputs.features.device
        guide = work_float(inputs.guide)
        top = guide.topk(dominant, dim=-1).indices if dominant else guide.new_zeros(batch, 0)
        top = top.long()
        is_dominant = torch.zeros(batch, count, dtype=torch.bool, device=device)
        is_dominant.scatter_(1, top, True)
        remaining = count - dominant
        # positions of the remaining tokens, ascending, (B, M): a stable sort puts them last
        rest = is_dominant.to(torch.int8).argsort(dim=-1, stable=True)[:, :remaining]
        dominant_index = is_dominant.to(torch.int8).argsort(dim=-1, stable=True, descending=True)
        dominant_index = dominant_index[:, :dominant]
        features = inputs.features
        parts_index = [dominant_index]
        parts_tokens = [gather_tokens(features, dominant_index)]
        parts_sizes = [torch.ones(batch, dominant, device=device)]
        if contextual:
            step = max(1, remaining // contextual)
            target_slots = torch.arange(0, remaining, step, device=device)[:contextual]
            is_target = torch.zeros(remaining, dtype=torch.bool, device=device)
            is_target[target_slots] = True
            other_slots = (~is_target).nonzero().squeeze(-1)
            target_index = rest[:, target_slots]
            other_index = rest[:, other_slots]
            metric = normalized(inputs.keys if inputs.keys is not None else features)
            similarity = gather_tokens(metric, other_index) @ gather_tokens(
                metric, target_index
            ).transpose(-1, -2)
            assign = similarity.argmax(dim=-1)  # (B, M - c), a target slot
            width = features.shape[-1]
            flat = (assign + contextual * torch.arange(batch, device=device)[:, None]).reshape(-1)
            others = work_float(gather_tokens(features, other_index)).reshape(-1, width)
            sums = others.new_zeros(batch * contextual, width).index_add_(0, flat, others)
            joined = others.new_zeros(batch * contextual).index_add_(
                0, flat, others.new_ones(others.shape[0])
            )
            sums = sums.reshape(batch, contextual, width)
            joined = joined.reshape(batch, contextual)
            targets = work_float(gather_tokens(features, target_index))
            if self.contextual_merge == "reference":
                tokens = targets + sums / joined.clamp_min(1).unsqueeze(-1)
            else:
                tokens = (targets + sums) / (1 + joined).unsqueeze(-1)
            parts_index.append(target_index)
            parts_tokens.append(tokens.to(features.dtype))
            parts_sizes.append((1 + joined).float())
        index = torch.cat(parts_index, dim=1)
        order = index.argsort(dim=-1)
        return ReducedTokens(
            gather_tokens(torch.cat(parts_tokens, dim=1), order),
            torch.cat(parts_sizes, dim=1).gather(1, order),
            index.gather(1, order),
        )
