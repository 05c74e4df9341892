"""The one block runner, the model entry scope, and sizes that travel with outputs.

A pre-norm transformer block differs between libraries only in the names of its
parts. :class:`BlockSpec` names them; :func:`run_block` runs "attention, reduce,
MLP" for every family::

    x = x + drop1(ls1(attn(norm1(x))))     # attention path observes q, k
    x = site.reduce(x, owner=attn)         # merge with that observation
    x = x + drop2(ls2(mlp(norm2(x))))

Post-norm blocks (BERT) run ``x = attn(x); reduce; x = mlp(x)`` where each part
includes its own residual and norm.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from turbo_core import ReductionState

from .attention import QKVLayout, layout_attention
from .patch import TurboPatch, no_grad_checkpointing
from .site import ReductionSite, SiteCall

__all__ = [
    "BlockSpec",
    "TurboBypassWarning",
    "attach_sizes",
    "install_blocks",
    "install_layout_attention",
    "install_scope",
    "restore_tokens",
    "run_block",
    "size_weighted_mean",
    "token_sizes",
]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """A block family as attribute names (dotted paths allowed; None = absent).

    Attributes:
        attn: the attention sub-layer called on the normed input.
        owner: the module that runs the attention function (the observation's key);
            defaults to ``attn``.
        layout: how to project q/k/v when the model has no attention registry;
            None calls ``attn`` itself (transformers routes it to Turbo's function).
        ls1, ls2: layer scale: a module, or a parameter that multiplies.
        post_norm: BERT-style block (see the module docstring).
        mask_arg: keyword under which a layout attention receives the block's mask.
    """

    attn: str
    mlp: str
    norm1: str | None = None
    norm2: str | None = None
    owner: str | None = None
    layout: QKVLayout | None = None
    ls1: str | None = None
    ls2: str | None = None
    drop1: str | None = None
    drop2: str | None = None
    post_norm: bool = False
    mask_arg: str = "attn_mask"

    def part(self, block: nn.Module, name: str | None) -> Any:
        if name is None:
            return None
        found: Any = block
        for piece in name.split("."):
            found = getattr(found, piece)
        return found

    def check(self, block: nn.Module) -> None:
        """Raise a TypeError naming the parts ``block`` lacks (before anything is patched)."""
        names = (self.attn, self.mlp, self.norm1, self.norm2, self.owner)
        missing = []
        for name in (n for n in names if n is not None):
            try:
                self.part(block, name)
            except AttributeError:
                missing.append(name)
        if missing:
            raise TypeError(f"{type(block).__name__} has no {missing}")
        if self.layout is not None:
            self.layout.check(self.part(block, self.attn))


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _scaled(scale: Any, x: torch.Tensor) -> torch.Tensor:
    if scale is None:
        return x
    return scale * x if isinstance(scale, torch.Tensor) else scale(x)


def run_block(
    block: nn.Module,
    spec: BlockSpec,
    site: ReductionSite,
    call: SiteCall,
    x: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """One block on Turbo's path; ``args``/``kwargs`` are the block's own call arguments."""
    part = spec.part
    attn = part(block, spec.attn)
    owner = part(block, spec.owner) if spec.owner is not None else attn
    if spec.post_norm:
        x = _first(attn(x, *args, **kwargs))
        x = site.reduce(call, x, owner)
        return part(block, spec.mlp)(x)  # type: ignore[no-any-return]
    h = part(block, spec.norm1)(x)
    if spec.layout is not None:  # through the module's call, so its hooks run
        if kwargs.pop("is_causal", False):
            raise ValueError("is_causal is not supported while Turbo merges tokens")
        mask = kwargs.pop(spec.mask_arg, args[0] if args else None)
        h = _first(attn(h, attn_mask=mask, **kwargs))
    else:
        h = _first(attn(h, *args, **kwargs))
    h = _scaled(part(block, spec.ls1), h)
    drop1 = part(block, spec.drop1)
    x = x + (h if drop1 is None else drop1(h))
    x = site.reduce(call, x, owner)  # (B, N, C) -> (B, N - r, C)
    h = _scaled(part(block, spec.ls2), part(block, spec.mlp)(part(block, spec.norm2)(x)))
    drop2 = part(block, spec.drop2)
    return x + (h if drop2 is None else drop2(h))


def install_blocks(
    patch: TurboPatch, site: ReductionSite, blocks: Iterable[nn.Module], spec: BlockSpec
) -> None:
    """Run every block through :func:`run_block` while a call is active on ``site``."""
    blocks = list(blocks)
    for block in blocks:  # check all before patching any
        spec.check(block)
    for block in blocks:
        if spec.layout is not None:
            install_layout_attention(patch, site, spec.part(block, spec.attn), spec.layout)

        def forward(
            original: Callable[..., Any], x: Any, *args: Any, _b: nn.Module = block, **kw: Any
        ) -> Any:
            call = site.current()
            if call is None:
                return original(x, *args, **kw)
            no_grad_checkpointing(_b)
            return run_block(_b, spec, site, call, x, *args, **kw)

        patch.override(block, "forward", forward)


def install_layout_attention(
    patch: TurboPatch, site: ReductionSite, attention: nn.Module, layout: QKVLayout
) -> None:
    """``attention`` on Turbo's path during a call (``layout_attention``), else as before.

    Going through the module's own call keeps its hooks (accelerate loading offloaded
    weights such as EVA's ``q_bias``, user hooks) working.
    """

    def forward(original: Callable[..., Any], x: Any, *args: Any, **kw: Any) -> Any:
        call = site.current()
        if call is None:
            return original(x, *args, **kw)
        if kw.pop("is_causal", False):
            raise ValueError("is_causal is not supported while Turbo merges tokens")
        mask = kw.pop("attn_mask", None)
        return layout_attention(attention, layout, x, site, call, attn_mask=mask, **kw)

    patch.override(attention, "forward", forward)


# ------------------------------------------------------------- scope and sizes
def attach_sizes(output: Any, state: ReductionState) -> Any:
    """Hang this call's sizes (and sources) on the output's token tensor.

    The tensor is ``output`` itself, or its ``last_hidden_state``; only when its
    ``(B, N)`` matches the state's, so a pooled or projected output gets nothing.
    """
    tensor = output if isinstance(output, torch.Tensor) else None
    if tensor is None:
        tensor = getattr(output, "last_hidden_state", None)
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        return output
    size = state.size
    if size is None and state.block_index == 0:
        return output  # no block ran: nothing to say
    if size is not None and size.shape[:2] != tensor.shape[:2]:
        return output
    tensor.turbo_size = size  # type: ignore[attr-defined]
    tensor.turbo_source = state.source  # type: ignore[attr-defined]
    return output


class TurboBypassWarning(RuntimeWarning):
    """A patched model ran, but none of its blocks went through Turbo."""


def _report_bypass(site: ReductionSite, module: nn.Module) -> None:
    warnings.warn(
        f"{type(module).__name__} ran under Turbo but none of the {site.num_blocks} blocks "
        f"of site {site.name!r} went through Turbo's block runner: something replaced or "
        "bypassed their forward after turbo_adapters.apply (nothing was merged)",
        TurboBypassWarning,
        stacklevel=4,
    )


def restore_tokens(output: Any, state: ReductionState) -> Any:
    """``output`` with its token tensor back at the original length and order."""
    if state.source is None:
        return output  # nothing merged
    index = state.source.unsqueeze(-1)  # (B, N_original, 1): slot of every original token

    def full(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, index.expand(-1, -1, x.shape[-1]))

    if isinstance(output, torch.Tensor):
        return full(output)
    if isinstance(output, tuple):
        return (full(output[0]), *output[1:])
    output.last_hidden_state = full(output.last_hidden_state)
    return output


def token_sizes(x: torch.Tensor) -> torch.Tensor | None:
    """The ``(B, N, 1)`` sizes of a patched model's token output (None: all ones).

    Each token stands for that many original tokens; use them as weights when
    pooling (:func:`size_weighted_mean`).
    """
    return getattr(x, "turbo_size", None)


def install_scope(
    patch: TurboPatch,
    site: ReductionSite,
    module: nn.Module,
    name: str = "forward",
    token_mask: Callable[..., torch.Tensor | None] | None = None,
    restore: bool = False,
    when: Callable[[], bool] | None = None,
) -> None:
    """Open one site call around ``module.<name>`` and attach its sizes to the output.

    Args:
        token_mask: ``token_mask(*args, **kwargs)`` derives the ``(B, N)`` padding mask
            from the call's arguments (text models).
        restore: hand the tokens back at full length (every original token gets its
            merged token's value; needs source tracking on the site), for heads that
            average all tokens: their plain mean is then the size-weighted mean.
        when: open the call only while ``when()`` is true (e.g. a vision-language
            model's tower mode); otherwise ``module.<name>`` runs unchanged.
    """

    def entry(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if when is not None and not when():
            return original(*args, **kwargs)
        mask = token_mask(*args, **kwargs) if token_mask is not None else None
        outermost = site.current() is None
        with site.scope(token_mask=mask) as call:
            output = original(*args, **kwargs)
            if outermost and call.state.block_index == 0:
                _report_bypass(site, module)
            if restore:
                return restore_tokens(output, call.state)
            return attach_sizes(output, call.state)

    patch.override(module, name, entry)


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens where each token counts as many originals as it stands for."""
    if size is None:
        return x.mean(dim=1)
    weight = size.to(x.dtype)
    return (x * weight).sum(dim=1) / weight.sum(dim=1)
