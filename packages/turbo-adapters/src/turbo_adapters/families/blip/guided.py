"""Cross-modal guidance shared by BLIP and BLIP-2: one image reduction ranked by a cross-attention.

Between the vision tower and the layers that cross-attend to the image, a model call
reduces the image tokens once more. The ranking comes from the first cross-attention
itself: its query rows (BLIP: the text tokens; BLIP-2 / InstructBLIP: the Q-Former's
queries, which have read the text in the self-attention before) attend over the image
keys; that attention, averaged over heads and pooled over the rows (mean or max), is
the semantic value, the keys averaged over heads the redundancy metric. The
adapters supply q and k from the library's own projection modules, at the moment the
first cross-attention is called (its input exists only then); this module ranks, merges
or prunes, and keeps the call's sizes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from turbo_core.merging import merge_sources

from ...blocks import TurboBypassWarning
from ...patch import TurboPatch
from ...site import ReductionSite, SiteCall

__all__ = [
    "CROSS_SITE",
    "POOLS",
    "REDUCTIONS",
    "GuidedCall",
    "active",
    "add_guided_site",
    "check_options",
    "guided_call",
    "rank_image",
    "reduce_image",
]

#: The site's name in every patch that uses cross-modal guidance.
CROSS_SITE = "text-guided"
#: ``merge``: size-weighted merging; ``prune``: dropped, the survivors keep their sizes.
REDUCTIONS = ("merge", "prune")
#: How the rows' attention over the image becomes one value per image token.
POOLS = ("mean", "max")


@dataclasses.dataclass
class GuidedCall:
    """One call through the guided site.

    Attributes:
        call: the site call (reducer snapshot and state).
        image: the image tensor the cross-attentions receive in this call.
        size: ``(B, N, 1)`` sizes of ``image`` from the vision tower, or None (all ones).
        reduce: ``"merge"`` or ``"prune"``.
        pool: ``"mean"`` or ``"max"``.
        row_weight: ``(B, T)`` weights of the cross-attention's rows (text padding), or
            None: every row counts.
        reduced: the image after the reduction, once the first cross-attention ran.
    """

    call: SiteCall
    image: torch.Tensor
    size: torch.Tensor | None
    reduce: str
    pool: str
    row_weight: torch.Tensor | None = None
    reduced: torch.Tensor | None = None

    @property
    def reduced_size(self) -> torch.Tensor | None:
        """Sizes of :attr:`reduced` (None: all ones)."""
        return self.call.state.size


_GUIDED: contextvars.ContextVar[GuidedCall | None] = contextvars.ContextVar(
    "turbo_blip_guided_call", default=None
)


def check_options(reduce: str, pool: str) -> None:
    """Clear errors for the two choices every guided path takes."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def add_guided_site(patch: TurboPatch, r: int, changes: dict[str, Any]) -> ReductionSite:
    """The one-block site ``"text-guided"``: the vision site's config, ``min_tokens=0``."""
    if CROSS_SITE in patch.sites:
        raise ValueError(f"cross-modal guidance is installed already (site {CROSS_SITE!r})")
    config = patch.sites["vision"].config.replace(r=r, min_tokens=0, **changes)
    return patch.add_site(ReductionSite(CROSS_SITE, config, 1))


def active() -> GuidedCall | None:
    """The guided call running in this thread/context, if any."""
    return _GUIDED.get()


@contextlib.contextmanager
def guided_call(
    site: ReductionSite,
    image: torch.Tensor,
    size: torch.Tensor | None,
    *,
    reduce: str,
    pool: str,
    row_weight: torch.Tensor | None = None,
) -> Iterator[GuidedCall]:
    """Open one call of the guided site for ``image``; :func:`active` returns it inside.

    A call whose first cross-attention never reached :func:`reduce_image` (another
    library replaced its forward after the patch) ends with a
    :class:`~turbo_adapters.TurboBypassWarning`: nothing was reduced.
    """
    with site.scope() as call:
        guided = GuidedCall(call, image, size, reduce, pool, row_weight)
        token = _GUIDED.set(guided)
        try:
            yield guided
        finally:
            _GUIDED.reset(token)
        if guided.reduced is None:
            warnings.warn(
                f"the image went to the cross-attentions under Turbo's {site.name!r} site, but "
                "the first cross-attention did not go through Turbo: something replaced or "
                "bypassed its forward after use_cross_modal_guidance (nothing was merged)",
                TurboBypassWarning,
                stacklevel=4,
            )


def rank_image(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    pool: str = "mean",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, N)``: how much the rows attend to each image token.

    Args:
        q: ``(B, H, T, d)`` the cross-attention's queries (T rows).
        k: ``(B, H, N, d)`` its keys over the image.
        scale: the attention's logit scale.
        pool: ``"mean"`` over the rows (weighted by ``weight``) or ``"max"`` over the
            rows whose weight is positive.
        weight: ``(B, T)`` row weights (a padding mask); None: every row counts.
        bias: ``(B, 1, 1, N)`` additive logit bias the cross-attention itself adds
            (``log(size)``), so the ranking sees the attention the model computes.
    """
    logits = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1).mean(dim=1)  # (B, T, N), averaged over heads
    if weight is None:
        weight = torch.ones(probs.shape[:2], dtype=probs.dtype, device=probs.device)
    weight = weight.to(probs.dtype).unsqueeze(-1)
    if pool == "max":
        return probs.masked_fill(weight <= 0, float("-inf")).amax(dim=1)
    return (probs * weight).sum(dim=1) / weight.sum(dim=1)


def reduce_image(
    guided: GuidedCall,
    queries: Callable[[], torch.Tensor],
    keys: Callable[[], torch.Tensor],
    *,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rank the image by the first cross-attention and remove the site's r tokens.

    ``queries()`` and ``keys()`` return that attention's ``q`` (B, H, T, d) and ``k``
    (B, H, N, d) over the full image, from the library's own projection modules; neither
    runs at r = 0 (the image itself comes back), ``queries()`` only when the ranking uses
    semantics. The keys averaged over heads are the redundancy metric,
    :func:`rank_image` the semantic value. Sizes (from the vision tower) follow merges;
    pruned tokens take theirs with them.
    """
    call, image = guided.call, guided.image
    state, reducer = call.state, call.reducer
    r = reducer.r_now(state, image.shape[1])
    state.size = None if guided.size is None else guided.size.clone()
    if r == 0:
        reduced = image
        if reducer.config.trace_source:
            state.source = _identity_source(image)
        state.r_applied.append(0)
    else:
        k = keys()
        semantic = None
        if reducer.config.uses_semantics:
            semantic = rank_image(
                queries(), k, scale=scale, pool=guided.pool, weight=guided.row_weight, bias=bias
            ).float()
        plan = reducer.plan(k.mean(dim=1), semantic, r)
        if guided.reduce == "merge":
            reduced = reducer.merge(image, plan, state)
        else:
            if reducer.config.trace_source:
                state.source = merge_sources(_identity_source(image), plan)
            index = plan.kept_idx.unsqueeze(-1)
            reduced = image.gather(1, index.expand(-1, -1, image.shape[-1]))
            state.size = state.sizes_for(image).gather(1, index)
        state.r_applied.append(plan.r)
    state.token_counts.append(reduced.shape[1])
    state.block_index += 1
    guided.reduced = reduced
    return reduced


def _identity_source(image: torch.Tensor) -> torch.Tensor:
    return torch.arange(image.shape[1], device=image.device).expand(image.shape[0], -1)
