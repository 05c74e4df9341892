"""A reduction site for padded batches of variable-length images (SigLIP2's NaFlex).

A NaFlex batch holds images of different patch counts, padded to one length and marked
by a ``(B, N)`` mask. The shared site (:class:`~turbo_adapters.site.ReductionSite`)
plans one count ``r`` per block for the whole batch and keeps padding as size-0 tokens
in place; merged sequences then interleave padding with real tokens, so a row's
bipartite split, and its schedule (resolved from the padded length), differ from the
image run alone.

:class:`PaddedRowsSite` reduces every padded row as if its image ran alone at its own
length:

- each row's schedule is resolved from its real token count;
- padding never merges, is never a partner, and gets no attention from the guide (the
  mean query is the mean over the row's real queries; padded keys are masked);
- from the first merge on, every row holds its real tokens first, in order, and size-0
  dead slots after them up to the batch's longest row (masked by ``log 0`` in every
  attention); the padding itself leaves the sequence;
- :meth:`PaddedRowsSite.restore` hands the tokens back at full length: every real
  token gets its merged token's value, every padding position what entered the
  encoder (padding takes no part in a merged encoder).

Batches without padding take the shared site's path unchanged (one batched plan).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from turbo_core import ReductionState, guide_attention, resolve_schedule

from .blocks import restore_tokens
from .patch import TurboPatch
from .site import Observation, ReductionSite, SiteCall, _stacklevel_of_caller

__all__ = ["PaddedRowsSite", "install_padded_restore"]

_ROWS = "turbo_padded_rows"


@dataclasses.dataclass
class PaddedRows:
    """Per-row bookkeeping of one padded call (in ``state.extras``).

    Attributes:
        schedules: each row's resolved r per block (from its real token count).
        real: ``(B, N)`` bool, the call's original mask (True at real tokens).
        slot: ``(B, N)`` current slot of every original token (meaningless at padding);
            None until the first merge.
        lengths: each row's current real token count.
        counts: each row's real token count after each block.
    """

    schedules: list[tuple[int, ...]]
    real: torch.Tensor
    slot: torch.Tensor | None = None
    lengths: list[int] = dataclasses.field(default_factory=list)
    counts: list[list[int]] = dataclasses.field(default_factory=list)

    def r_at(self, row: int, block: int) -> int:
        schedule = self.schedules[row]
        return schedule[block] if block < len(schedule) else 0


def padded_rows(state: ReductionState) -> PaddedRows | None:
    """The per-row bookkeeping of a padded call (None: no padding, or not looked at yet)."""
    rows = state.extras.get(_ROWS)
    return rows if isinstance(rows, PaddedRows) else None


class PaddedRowsSite(ReductionSite):
    """A site that reduces each row of a padded batch as if its image ran alone.

    Same arguments as :class:`~turbo_adapters.site.ReductionSite`; padding comes in as
    the scope's ``token_mask``.
    """

    # ------------------------------------------------------------ bookkeeping
    def _rows(self, call: SiteCall) -> PaddedRows | None:
        """Resolve every row's schedule on the call's first block (one host sync)."""
        extras = call.state.extras
        if _ROWS in extras:
            return padded_rows(call.state)
        mask = call.state.token_mask()
        rows = None
        if mask is not None and not bool(mask.all()):
            config = call.reducer.config
            lengths = [int(n) for n in mask.sum(dim=1).tolist()]
            resolved = [
                resolve_schedule(
                    config.r, n, self.num_blocks, protected=config.protected_tokens,
                    min_tokens=config.min_tokens, rule=self.rule, warn=False,
                )
                for n in lengths
            ]  # fmt: skip
            # the batch's own schedule (last_state.schedule) is the longest image's
            call.state.resolve(
                config.r, max(lengths), protected=config.protected_tokens,
                min_tokens=config.min_tokens,
            )  # fmt: skip
            clipped = next((r for r in resolved if r.clipped), None)
            if clipped is not None and not call.reducer.clip_said:
                model = self.model_ref() if self.model_ref is not None else None
                call.reducer.warn_clipped(clipped, stacklevel=_stacklevel_of_caller(model))
            rows = PaddedRows(
                [r.r for r in resolved], mask, lengths=lengths, counts=[[] for _ in lengths]
            )
        extras[_ROWS] = rows
        return rows

    # ------------------------------------------------------ attention -> block
    def observe(
        self,
        call: SiteCall,
        owner: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float | None = None,
    ) -> None:
        rows = self._rows(call)
        if rows is None:
            super().observe(call, owner, q, k, scale=scale)
            return
        state, config = call.state, call.reducer.config
        block = state.block_index
        if not any(rows.r_at(i, block) for i in range(len(rows.schedules))):
            call.observations.pop(owner, None)
            return
        semantic = None
        if config.uses_semantics:
            real = state.token_mask()
            assert real is not None  # a padded call keeps its sizes
            if self.guide == "cls":
                guide_q = q[:, :, 0]  # rows keep their order: token 0 is the row's first
            else:  # the mean over the row's real queries, never over padding
                weight = real.to(q.dtype)[:, None, :, None]
                guide_q = (q * weight).sum(dim=2) / weight.sum(dim=2)
            size = state.size if config.prop_attn else None
            semantic = guide_attention(guide_q, k, size=size, scale=scale, key_padding_mask=real)
        call.observations[owner] = Observation(k.mean(dim=1), semantic)

    def reduce(self, call: SiteCall, x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        rows = self._rows(call)
        if rows is None:
            return super().reduce(call, x, owner)  # no padding: one batched plan
        if owner not in call.observations:  # no row merges in this block
            for count, n in zip(rows.counts, rows.lengths, strict=True):
                count.append(n)
            return super().reduce(call, x, owner)
        observed = call.observations.pop(owner)
        if observed.metric.shape[:2] != x.shape[:2]:
            raise RuntimeError(
                f"{type(owner).__name__} observed {tuple(observed.metric.shape[:2])} tokens "
                f"but the block merges {tuple(x.shape[:2])}"
            )
        state, reducer = call.state, call.reducer
        block, (batch, length, channels) = state.block_index, x.shape
        real = state.token_mask()
        assert real is not None
        size = state.sizes_for(x)
        if rows.slot is None:  # the first merge: every original token in its own slot
            rows.slot = torch.arange(length, device=x.device).expand(batch, -1).clone()
        merged: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(batch):
            index = real[i].nonzero().squeeze(-1)  # the row's real tokens, in order
            n = index.numel()
            semantic = None if observed.semantic is None else observed.semantic[i, index][None]
            plan = reducer.plan(
                observed.metric[i, index][None], semantic,
                reducer.effective_r(n, rows.r_at(i, block)), block,
            )  # fmt: skip
            xi, si = reducer.merger.merge(x[i, index][None], plan, size[i, index][None])
            assert si is not None
            moved = torch.zeros(length, dtype=torch.long, device=x.device)
            moved[index] = plan.assignment()[0]
            rows.slot[i] = moved[rows.slot[i]]
            rows.lengths[i] = xi.shape[1]
            rows.counts[i].append(xi.shape[1])
            merged.append((xi[0], si[0]))
        width = max(xi.shape[0] for xi, _ in merged)
        out = x.new_zeros(batch, width, channels)
        new_size = size.new_zeros(batch, width, 1)  # dead slots: size 0, masked everywhere
        for i, (xi, si) in enumerate(merged):
            out[i, : xi.shape[0]] = xi
            new_size[i, : si.shape[0]] = si
        state.size = new_size
        state.source = rows.slot.masked_fill(~rows.real, -1)  # -1: padding has no slot
        state.r_applied.append(length - width)
        state.token_counts.append(width)
        state.block_index += 1
        return out

    # ---------------------------------------------------------------- restore
    def restore(self, output: Any, state: ReductionState, entry: torch.Tensor | None) -> Any:
        """``output`` (the encoder's) with its tokens back at full length.

        Args:
            entry: the encoder's input, whose padding positions are handed back as they
                were (padding takes no part in a merged encoder).
        """
        rows = padded_rows(state)
        if rows is None or rows.slot is None:
            return restore_tokens(output, state)  # batched path, or nothing merged
        if entry is None:
            raise RuntimeError("restoring a padded batch needs the encoder's input tokens")
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        index = rows.slot.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        full = torch.where(rows.real.unsqueeze(-1), hidden.gather(1, index), entry)
        if isinstance(output, torch.Tensor):
            return full
        if isinstance(output, tuple):
            return (full, *output[1:])
        output.last_hidden_state = full
        return output


def install_padded_restore(
    patch: TurboPatch,
    site: PaddedRowsSite,
    encoder: nn.Module,
    entry: Callable[..., torch.Tensor | None],
) -> None:
    """Hand ``encoder``'s tokens back at full length (:meth:`PaddedRowsSite.restore`).

    The call is opened outside (the tower's ``forward``, which knows the padding mask);
    ``entry(*args, **kwargs)`` picks the encoder's input tokens from its arguments.
    """

    def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = site.current()
        output = original(*args, **kwargs)
        if call is None:
            return output
        return site.restore(output, call.state, entry(*args, **kwargs))

    patch.override(encoder, "forward", forward)
