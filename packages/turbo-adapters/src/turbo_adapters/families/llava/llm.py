"""LLM mode for LLaVA-style models: FastV / PyramidDrop reduction of image tokens in the decoder.

One implementation for every family whose language model is a transformers decoder
with LLaMA-style layers (``self_attn`` with ``q_proj``/``k_proj``, ``input_layernorm``,
rotary ``position_embeddings``): LLaVA, LLaVA-NeXT and MiniGPT-v2. A family calls
:func:`install_decoder_layers` on the decoder's layers and, around the decoder
model's ``forward``, :func:`start_call` (with the image positions of a prefill) and
:func:`forward_in_call`.

At the input of decoder layer ``K`` (prefill only), the image tokens are ranked by the
attention that the last prompt token (``rank="last"``) or every text token
(``rank="text"``) pays them, computed with layer K's own q/k projections and rotary
embedding. A fraction ``keep`` of each row's image tokens stays:

- ``method="prune"`` drops the least attended ones (FastV);
- ``method="merge"`` ranks by Turbo's fusion ``E = R - alpha * A`` (R: the token's
  highest cosine similarity to another image token of its row, A: its attention,
  normalised to mean 1) and averages every dropped token into its most similar kept
  token (size-weighted); later layers add ``log(size)`` to the merged keys' logits.

Further stages (``stages``, PyramidDrop) repeat the ranking at later layers K2 < K3 ...
on the tokens still present, each keeping a smaller share of the row's original image
tokens; a stage's layers run on its own slots, and its KV cache holds only them.

Layers K.. then run on the shorter sequence: kept tokens keep their original rotary
positions, the attention mask is rebuilt from the kept columns (rows that keep fewer
tokens than the longest row carry masked filler slots), and the KV cache of those
layers holds only the kept tokens. The cache carries what the decode steps need
(``LLMCacheState``), so ``generate`` and hand-written decode loops stay consistent.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...compat import accepts, installed_version, require, versions_tested
from ...patch import TurboPatch

__all__ = [
    "LLMCacheState",
    "LLMCall",
    "LLMReduction",
    "StageState",
    "bind_arguments",
    "check_decoder",
    "find_cache",
    "forward_in_call",
    "install_decoder_layers",
    "reduce_at_layer",
    "start_call",
]

_STATE_ATTR = "_turbo_llm_state"
METHODS = ("prune", "merge")
RANKS = ("last", "text", "raters")


@dataclasses.dataclass(frozen=True)
class LLMReduction:
    """Settings of LLM mode.

    Attributes:
        layer: decoder layer K whose input is reduced (0 <= K < number of layers).
        keep: fraction of each row's image tokens kept, in (0, 1] (1 keeps them all; layers
            >= K still run on the re-laid sequence, which drops left padding).
        method: ``"prune"`` (FastV) or ``"merge"`` (Turbo's fusion, dropped tokens
            averaged into kept ones).
        rank: attention of the ``"last"`` prompt token, mean over all ``"text"`` tokens, or
            mean over SparseVLM's ``"raters"``: the instruction tokens (after the row's
            last image token) whose softmax relevance to the image tokens, at the decoder's
            input, is above their mean.
        alpha: weight of the attention against redundancy for ``"merge"``.
        recycle: with ``"prune"``, the share of each stage's dropped image tokens recycled
            (SparseVLM: 0.3): the ``int(share * dropped) + 1`` most attended dropped tokens
            are clustered by density peaks (``int(count / 10) + 1`` clusters, k-NN density
            with k = the cluster count) and each cluster is averaged into its centre's slot.
        stages: further ``(layer, keep)`` reductions after the first (PyramidDrop), layers
            strictly increasing after ``layer``; each ``keep`` is again a share of the
            row's ORIGINAL image tokens (cumulative, as PyramidDrop's ratio list), at most
            the previous stage's. Each stage ranks the image tokens still present by the
            same ``rank`` attention at its layer and keeps ``ceil(keep * N_image)``.
    """

    layer: int = 2
    keep: float = 0.5
    method: str = "prune"
    rank: str = "last"
    alpha: float = 1.0
    stages: tuple[tuple[int, float], ...] = ()
    recycle: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {self.layer!r}")
        if not isinstance(self.keep, (int, float)) or not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        stages = tuple(tuple(stage) for stage in self.stages)
        previous_layer, previous_keep = self.layer, float(self.keep)
        for stage in stages:
            if len(stage) != 2:
                raise ValueError(f"stages must hold (layer, keep) pairs, got {stage!r}")
            layer, keep = stage
            if isinstance(layer, bool) or not isinstance(layer, int) or layer <= previous_layer:
                raise ValueError(
                    f"stages: each layer must be an int > the previous stage's layer "
                    f"({previous_layer}), got {layer!r}"
                )
            if not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= previous_keep:
                raise ValueError(
                    f"stages: each keep must be a fraction in (0, {previous_keep:g}] (the "
                    f"previous stage's keep; shares of the original image tokens), got {keep!r}"
                )
            previous_layer, previous_keep = layer, float(keep)
        object.__setattr__(self, "stages", stages)
        if not isinstance(self.recycle, (int, float)) or not 0.0 <= float(self.recycle) <= 1.0:
            raise ValueError(f"recycle must be a fraction in [0, 1], got {self.recycle!r}")
        if self.recycle and self.method != "prune":
            raise ValueError("recycle needs method='prune' ('merge' already keeps every token)")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS}, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise ValueError(f"alpha must be a number >= 0, got {self.alpha!r}")

    @property
    def schedule(self) -> tuple[tuple[int, float], ...]:
        """Every ``(layer, keep)`` stage, the first one included."""
        return ((self.layer, float(self.keep)), *self.stages)

    @property
    def last_layer(self) -> int:
        """The deepest layer reduced (must be below the decoder's layer count)."""
        return self.schedule[-1][0]

    @classmethod
    def sparse_vlm(
        cls,
        counts: Sequence[int] = (66, 30, 17),
        layers: Sequence[int] = (3, 7, 16),
        image_tokens: int = 576,
        recycle: float = 0.3,
    ) -> LLMReduction:
        """SparseVLM (v1): text raters rank the image tokens at ``layers``, keeping
        ``counts`` of ``image_tokens`` (its LLaVA-1.5 lists: 64 -> 66, 30, 17; 128 -> 303,
        110, 36; 192 -> 300, 200, 110), and recycle 30 % of the dropped ones into
        clusters. Its pruning follows layers 2, 6, 15; here it precedes 3, 7, 16 (the same
        layers see all tokens), ranked with the attention of the layer it precedes."""
        if len(counts) != len(layers) or not layers:
            raise ValueError(
                f"counts and layers must be non-empty and of one length, got {len(counts)} "
                f"counts and {len(layers)} layers"
            )
        if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or image_tokens < 1:
            raise ValueError(f"image_tokens must be an int >= 1, got {image_tokens!r}")
        keeps = [min(1.0, count / image_tokens) for count in counts]
        stages = tuple(zip(layers[1:], keeps[1:], strict=True))
        return cls(
            layer=layers[0], keep=keeps[0], method="prune", rank="raters",
            stages=stages, recycle=recycle,
        )  # fmt: skip

    @classmethod
    def pyramid_drop(
        cls, layers: Sequence[int] = (8, 16, 24), ratio: float = 0.5, rank: str = "last"
    ) -> LLMReduction:
        """PyramidDrop: at each of ``layers`` keep ``ratio`` of the image tokens still there
        (so ``ratio ** (s + 1)`` of the original after stage s), ranked by the last
        instruction token's attention. The defaults are its LLaVA-1.5 setting
        (layers 8, 16, 24; ratios 0.5, 0.25, 0.125)."""
        if not layers:
            raise ValueError("layers must name at least one decoder layer")
        if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must be a fraction in (0, 1], got {ratio!r}")
        keeps = [float(ratio) ** (s + 1) for s in range(len(layers))]
        stages = tuple(zip(layers[1:], keeps[1:], strict=True))
        return cls(layer=layers[0], keep=keeps[0], method="prune", rank=rank, stages=stages)


@dataclasses.dataclass
class StageState:
    """The slots one stage's layers (its layer up to the next stage's) run on.

    Attributes:
        layer: the first layer of the stage.
        kept: ``(B, N')`` original positions of the stage's slots (sorted per row).
        key_valid: ``(B, N')`` False at filler slots and padding.
        size: ``(B, N')`` original tokens each slot stands for.
    """

    layer: int
    kept: torch.Tensor
    key_valid: torch.Tensor
    size: torch.Tensor


@dataclasses.dataclass
class LLMCacheState:
    """What layers >= K need after the prefill (lives on the KV cache object).

    Attributes:
        prefill_len: length of the prompt before reduction (the other layers' cache).
        stages: one :class:`StageState` per stage, in layer order.

    ``layer``, ``kept``, ``key_valid`` and ``size`` are the first stage's.
    """

    prefill_len: int
    stages: list[StageState]

    @property
    def layer(self) -> int:
        return self.stages[0].layer

    @property
    def kept(self) -> torch.Tensor:
        return self.stages[0].kept

    @property
    def key_valid(self) -> torch.Tensor:
        return self.stages[0].key_valid

    @property
    def size(self) -> torch.Tensor:
        return self.stages[0].size

    def stage_of(self, index: int) -> int:
        """The stage decoder layer ``index`` belongs to, or -1 below the first."""
        return _stage_of([stage.layer for stage in self.stages], index)


def _stage_of(layers: Sequence[int], index: int) -> int:
    found = -1
    for stage, layer in enumerate(layers):
        if layer <= index:
            found = stage
    return found


@dataclasses.dataclass
class LLMCall:
    """One forward of the language model in LLM mode (prefill or decode step)."""

    settings: LLMReduction
    image_mask: torch.Tensor | None  # (B, N) at prefill, None when decoding
    mask2d: torch.Tensor | None  # the 2-D padding mask given to the model, if any
    cache: Any
    state: LLMCacheState | None = None
    layer_kwargs: dict[str, Any] | None = None  # replaced kwargs for the current stage
    raters: torch.Tensor | None = None  # (B, N) SparseVLM's text raters, at the prefill
    kwargs_stage: int = -1  # the stage layer_kwargs belong to


CURRENT: contextvars.ContextVar[LLMCall | None] = contextvars.ContextVar(
    "turbo_llava_llm_call", default=None
)


def find_cache(values: Any) -> Any:
    """The KV cache among a call's arguments or outputs, found by its type.

    transformers renamed the cache argument and output (``past_key_values`` to ``cache``
    in 5.25, with an alias until 5.40); finding the :class:`transformers.Cache` object
    itself does not depend on what it is called.

    Args:
        values: the values of a call's arguments, or a model output (a ``ModelOutput``,
            a tuple, or anything iterable).
    """
    cache_type = _cache_type()
    if isinstance(values, Mapping):
        values = values.values()
    for value in values or ():
        if isinstance(value, cache_type):
            return value
    return None


@functools.cache
def _cache_type() -> type:
    from transformers.cache_utils import Cache  # imported when first needed: a heavy module

    return Cache


def cache_state(cache: Any) -> LLMCacheState | None:
    """The LLM-mode state a KV cache carries, if any."""
    if cache is None:
        return None
    found = getattr(cache, "__dict__", {}).get(_STATE_ATTR)
    return found if isinstance(found, LLMCacheState) else None


def set_cache_state(cache: Any, state: LLMCacheState | None) -> None:
    if cache is None:
        return
    if state is None:
        cache.__dict__.pop(_STATE_ATTR, None)
    else:
        cache.__dict__[_STATE_ATTR] = state


# ------------------------------------------------------------------- scoring
def _rotary(attn: nn.Module) -> Any:
    return getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")  # noqa: B009


def text_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    valid: torch.Tensor,
    image_mask: torch.Tensor,
    rank: str,
    size: torch.Tensor | None = None,
    raters: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, N)`` attention paid to every token by the last or all text tokens of layer K.

    Recomputed from the layer's own norm, q/k projections and rotary embedding
    (heads averaged; one query row for ``"last"``); ``size`` (B, N), when tokens were
    merged at an earlier stage, adds ``log(size)`` to their logits as the layers do.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, n, _ = x.shape
    head_dim = attn.head_dim
    cos, sin = position_embeddings
    positions = torch.arange(n, device=x.device)
    last = (n - 1) - valid.flip(-1).to(torch.int64).argmax(-1)  # (B,) last valid token
    if rank == "last":  # one query row per sequence: project only that token
        rows = last[:, None]  # (B, 1)
        weights = torch.ones(batch, 1, device=x.device)
    else:
        rows = positions.expand(batch, n)
        chosen = raters if rank == "raters" and raters is not None else ~image_mask
        weights = (valid & chosen).float()
    pick = rows[:, :, None]
    x_q = x.gather(1, pick.expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(x_q).view(batch, rows.shape[1], -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, n, -1, head_dim).transpose(1, 2)
    cos_q = cos.expand(batch, -1, -1).gather(1, pick.expand(-1, -1, cos.shape[-1]))
    sin_q = sin.expand(batch, -1, -1).gather(1, pick.expand(-1, -1, sin.shape[-1]))
    rotary = _rotary(attn)
    q, _ = rotary(q, q, cos_q, sin_q)
    _, k = rotary(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * float(attn.scaling)
    if size is not None:
        logits = logits + size.float().clamp(min=1).log()[:, None, None, :]
    allowed = valid[:, None, None, :] & (positions[None, None, None, :] <= rows[:, None, :, None])
    logits = logits.masked_fill(~allowed, -math.inf)
    probs = logits.softmax(-1).nan_to_num(0.0).mean(1)  # (B, Nq, Nk)
    return (probs * weights[:, :, None]).sum(1) / weights.sum(1).clamp(min=1)[:, None]


def select_raters(
    hidden: torch.Tensor, valid: torch.Tensor, image_mask: torch.Tensor
) -> torch.Tensor:
    """``(B, N)`` SparseVLM's text raters from the decoder's input ``hidden``.

    Per row, the instruction tokens (valid tokens after the last image token) get
    ``softmax_t(v . t)`` averaged over the image tokens v; those above the mean rate.
    """
    raters = torch.zeros_like(valid)
    for b in range(hidden.shape[0]):
        image_idx = (image_mask[b] & valid[b]).nonzero().squeeze(-1)
        if not image_idx.numel():
            continue
        after = valid[b].clone()
        after[: int(image_idx[-1]) + 1] = False
        text_idx = after.nonzero().squeeze(-1)
        if not text_idx.numel():
            continue
        relevance = hidden[b, image_idx].float() @ hidden[b, text_idx].float().T
        score = relevance.softmax(-1).mean(0)
        raters[b, text_idx[score > score.mean()]] = True
    return raters


def _density_peaks(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of ``x`` (m, C), rows most attended first: (centres, clusters).

    Density ``exp(-mean of the k-NN squared distances)`` (k = ``clusters``, distances over
    sqrt(C)); a centre maximises density times the distance to a denser token; every token
    joins its nearest centre, a centre itself.
    """
    m, width = x.shape
    dist = torch.cdist(x.float(), x.float()) / width**0.5
    dist.fill_diagonal_(0.0)  # exactly: with k = 1 every density is then exactly 1
    nearest = dist.topk(min(clusters, m), dim=-1, largest=False).values
    density = (-nearest.square().mean(-1)).exp()
    denser = density[None, :] > density[:, None]  # [i, j]: j denser than i
    parent = torch.where(denser, dist, dist.max()).min(-1).values
    # SparseVLM breaks density ties with random noise; here the earlier (more attended)
    # token wins, so the choice is deterministic
    centres = torch.argsort(parent * density, descending=True, stable=True)[:clusters]
    cluster = dist[:, centres].argmin(-1)
    cluster[centres] = torch.arange(clusters, device=x.device)
    return centres, cluster


def _recycle(
    hidden: torch.Tensor,
    size: torch.Tensor,
    attention: torch.Tensor,
    dropped: torch.Tensor,
    share: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cluster the most attended dropped tokens; each cluster averages into its centre.

    Returns (centre positions, hidden, size) with the centres' rows replaced."""
    count = min(int(dropped.numel() * share) + 1, dropped.numel())
    chosen = dropped[attention[dropped].topk(count).indices]
    clusters = int(count / 10) + 1
    centres, cluster = _density_peaks(hidden[chosen], clusters)
    weight = size[chosen].to(hidden.dtype)
    total = hidden.new_zeros(clusters, hidden.shape[1]).index_add_(
        0, cluster, hidden[chosen] * weight[:, None]
    )
    mass = size.new_zeros(clusters).index_add_(0, cluster, size[chosen])
    centre_pos = chosen[centres]
    hidden = hidden.clone()
    size = size.clone()
    hidden[centre_pos] = total / mass.to(hidden.dtype)[:, None]
    size[centre_pos] = mass
    return centre_pos, hidden, size


# ---------------------------------------------------------------- selection
def _select_row(
    hidden: torch.Tensor,
    attention: torch.Tensor,
    image_idx: torch.Tensor,
    settings: LLMReduction,
    keep: int,
    size: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row: (kept image positions, merged hidden of the row, sizes of the row).

    ``keep`` image tokens of ``image_idx`` stay; ``size`` is what each slot stands for
    already (ones at the first stage), and a merge is weighted by it.
    """
    n = image_idx.numel()
    if keep >= n:
        return image_idx, hidden, size
    a = attention[image_idx]
    a = a / a.mean().clamp(min=1e-12)
    if settings.method == "prune":
        order = torch.argsort(a, descending=True, stable=True)  # most attended first
        kept_pos = image_idx[order[:keep]]
        if settings.recycle:
            centres, hidden, size = _recycle(
                hidden, size, attention, image_idx[order[keep:]], settings.recycle
            )
            kept_pos = torch.cat([kept_pos, centres])
        return kept_pos.sort().values, hidden, size
    feats = F.normalize(hidden[image_idx].float(), dim=-1)
    sim = feats @ feats.T
    sim.fill_diagonal_(-math.inf)
    energy = sim.max(-1).values - settings.alpha * a  # Turbo: redundant and unattended first
    order = torch.argsort(energy, stable=True)  # lowest energy is kept
    kept_local, dropped_local = order[:keep], order[keep:]
    sim.fill_diagonal_(1.0)
    target = kept_local[sim[dropped_local][:, kept_local].argmax(-1)]  # local index of target
    merged = hidden.clone()
    dst = image_idx[target]
    src = image_idx[dropped_local]
    weight = size.to(hidden.dtype)[:, None]
    total = torch.zeros_like(hidden).index_add_(
        0, dst, (hidden[src] * weight[src]).to(hidden.dtype)
    )
    count = torch.zeros_like(size).index_add_(0, dst, size[src])
    kept_pos = image_idx[kept_local]
    merged[kept_pos] = (hidden[kept_pos] * weight[kept_pos] + total[kept_pos]) / (
        size[kept_pos] + count[kept_pos]
    )[:, None]
    size = size.clone()
    size[kept_pos] = size[kept_pos] + count[kept_pos]
    return kept_pos.sort().values, merged, size


def _mask(
    key_valid: torch.Tensor, size: torch.Tensor, q_len: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(B, 1, q, kv)`` additive mask: causal on slots, filler/padding keys masked,
    ``log(size)`` on merged keys; every query sees at least itself."""
    kv = key_valid.shape[1]
    q_pos = torch.arange(kv - q_len, kv, device=key_valid.device)
    k_pos = torch.arange(kv, device=key_valid.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
    bias = size.to(dtype).clamp(min=1).log()[:, None, :].expand(-1, q_len, -1)
    neg = torch.finfo(dtype).min
    return torch.where(allowed, bias, torch.full_like(bias, neg))[:, None]


def reduce_at_layer(
    call: LLMCall,
    layer: nn.Module,
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    stage: int = 0,
) -> torch.Tensor:
    """Prefill at a stage's layer: rank, keep (or merge), and prepare kwargs for its layers.

    ``hidden`` is in the previous stage's slots (the full prompt at stage 0); ``kwargs``
    are the decoder's own, over the full prompt (position embeddings and ids are gathered
    from them at the kept slots' original positions).
    """
    assert call.image_mask is not None
    batch, n, _ = hidden.shape
    device = hidden.device
    full_len = call.image_mask.shape[1]
    full_valid = (
        call.mask2d.bool()
        if call.mask2d is not None
        else torch.ones(batch, full_len, dtype=torch.bool, device=device)
    )
    original_images = (call.image_mask & full_valid).sum(-1)  # (B,) image tokens per row
    if stage == 0:
        slots_pos = torch.arange(n, device=device).expand(batch, n)
        valid = full_valid
        slot_size = torch.ones(batch, n, dtype=hidden.dtype, device=device)
    else:
        assert call.state is not None
        previous = call.state.stages[stage - 1]
        slots_pos, valid, slot_size = previous.kept, previous.key_valid, previous.size
    image_mask = call.image_mask.gather(1, slots_pos) & valid
    cos_full, sin_full = kwargs["position_embeddings"]

    def at(table: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        table = table.expand(batch, -1, -1)
        return table.gather(1, where[:, :, None].expand(-1, -1, table.shape[-1]))

    pos_emb = (
        (cos_full, sin_full) if stage == 0 else (at(cos_full, slots_pos), at(sin_full, slots_pos))
    )
    raters = None if call.raters is None else call.raters.gather(1, slots_pos)
    attention = text_attention(
        layer, hidden, pos_emb, valid, image_mask, call.settings.rank,
        None if stage == 0 else slot_size, raters,
    )  # fmt: skip
    share = call.settings.schedule[stage][1]
    rows_pos, rows_hidden, rows_size, keep_counts = [], [], [], []
    for b in range(batch):
        image_idx = image_mask[b].nonzero().squeeze(-1)
        total = int(original_images[b])
        keep = max(1, math.ceil(share * total - 1e-9)) if total else 0
        kept_img, h, size = _select_row(
            hidden[b], attention[b], image_idx, call.settings, keep, slot_size[b]
        )
        text_idx = (valid[b] & ~image_mask[b]).nonzero().squeeze(-1)
        chosen = torch.cat([text_idx, kept_img]).sort().values
        rows_pos.append(chosen)
        rows_hidden.append(h)
        rows_size.append(size)
        keep_counts.append(chosen.numel())
    width = max(keep_counts)
    kept = torch.empty(batch, width, dtype=torch.long, device=device)
    key_valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
    for b, chosen in enumerate(rows_pos):
        # fillers: the unchosen slots nearest the start (masked, never attended)
        spare = torch.ones(n, dtype=torch.bool, device=device)
        spare[chosen] = False
        filler = spare.nonzero().squeeze(-1)[: width - chosen.numel()]
        slots = torch.cat([filler, chosen]).sort().values
        kept[b] = slots
        key_valid[b] = ~spare[slots]
    merged = torch.stack(rows_hidden)
    sizes = torch.stack(rows_size)
    index = kept[:, :, None]
    new_hidden = merged.gather(1, index.expand(-1, -1, merged.shape[-1]))
    size = sizes.gather(1, kept)
    original = slots_pos.gather(1, kept)  # the slots' positions in the full prompt
    state = StageState(call.settings.schedule[stage][0], original, key_valid, size)
    if stage == 0:
        call.state = LLMCacheState(full_len, [state])
    else:
        assert call.state is not None
        call.state.stages.append(state)
    call.layer_kwargs = {
        "position_embeddings": (at(cos_full, original), at(sin_full, original)),
        "attention_mask": _mask(key_valid, size, width, hidden.dtype),
    }
    call.kwargs_stage = stage
    if kwargs.get("position_ids") is not None:
        position_ids = kwargs["position_ids"]
        call.layer_kwargs["position_ids"] = position_ids.expand(batch, -1).gather(1, original)
    return new_hidden


def decode_kwargs(call: LLMCall, q_len: int, dtype: torch.dtype, stage: int = 0) -> dict[str, Any]:
    """Mask for a stage's layers on a decode step (their cache holds the stage's slots)."""
    assert call.state is not None
    prefill_len = call.state.prefill_len
    state = call.state.stages[stage]
    cached = call.cache.get_seq_length(state.layer)  # slots already in the stage's cache
    new = cached + q_len - state.kept.shape[1]  # tokens after the prompt, incl. this step
    batch = state.kept.shape[0]
    device = state.kept.device
    if call.mask2d is not None:
        tail = call.mask2d[:, prefill_len : prefill_len + new].bool()
    else:
        tail = torch.ones(batch, new, dtype=torch.bool, device=device)
    key_valid = torch.cat([state.key_valid, tail], dim=1)
    size = torch.cat([state.size, torch.ones(batch, new, dtype=state.size.dtype, device=device)], 1)
    return {"attention_mask": _mask(key_valid, size, q_len, dtype)}


# ---------------------------------------------------------------- installing
def check_decoder(adapter: str, decoder: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Refuse a decoder whose library lacks what LLM mode relies on (feature detection).

    LLM mode hands layers >= K their mask and rotary embeddings as the layers' own
    keyword arguments, recomputes layer K's attention from its ``q_proj`` / ``k_proj``
    and its module's ``apply_rotary_pos_emb``, and keeps its state on the KV cache
    object the decoder model receives. Each of these is checked here, so a library
    release that changed one is refused with
    :class:`~turbo_adapters.compat.IncompatibleLibraryError` when LLM mode is asked
    for, not mid-generation.

    Raises:
        IncompatibleLibraryError: naming ``adapter``, what is missing, the installed
            transformers and the tested range.
    """
    who = f"{adapter} (llm mode)"
    for layer in layers:
        for part in ("self_attn", "input_layernorm"):
            if not hasattr(layer, part):
                raise TypeError(f"{type(layer).__name__} has no {part}")
    layer, attn = layers[0], layers[0].self_attn
    layer_name = type(layer).__name__
    require(
        who,
        "transformers",
        accepts(layer.forward, ("attention_mask", "position_embeddings")),
        f"{layer_name}.forward to take attention_mask and position_embeddings by name",
    )
    require(
        who,
        "transformers",
        all(hasattr(attn, name) for name in ("q_proj", "k_proj", "head_dim", "scaling"))
        and callable(getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)),
        f"{type(attn).__name__} with q_proj, k_proj, head_dim, scaling and a module-level "
        "apply_rotary_pos_emb",
    )
    cache_params = [
        p for p in inspect.signature(decoder.forward).parameters.values()
        if "Cache" in str(p.annotation)
    ]  # fmt: skip
    require(
        who,
        "transformers",
        bool(cache_params),
        f"{type(decoder).__name__}.forward to take the KV cache (a transformers Cache) "
        "as an argument",
    )


def _orphan_cache_error(adapter: str, index: int) -> RuntimeError:
    return RuntimeError(
        f"{adapter} (llm mode): decoder layer {index} received the reduced KV cache of an "
        "LLM-mode prefill outside a Turbo call, so its attention mask would cover the full "
        "prompt while its cache holds only the kept tokens. Continue decoding through the "
        "patched model (forward or generate), not its language model directly; if you did, "
        "this transformers release passes the cache by a route turbo-adapters does not "
        "know (transformers "
        f"{installed_version('transformers')}, tested {versions_tested('transformers')})"
    )


def install_decoder_layers(patch: TurboPatch, layers: Sequence[nn.Module]) -> None:
    """Make decoder layers >= K run on the reduced sequence while an :class:`LLMCall` is on.

    At the prefill, layer K's input is reduced (:func:`reduce_at_layer`); on decode
    steps the first layer >= K builds the mask over the kept slots. Layers get the
    replaced mask and rotary embeddings as keyword arguments; outside a call (or
    below K) they run exactly as before, except that a layer >= K handed a reduced
    cache outside a call raises (it would otherwise fail inside the attention with a
    shape error that names nothing of ours).

    Call :func:`check_decoder` first: these overrides assume what it checks.
    """
    for index, layer in enumerate(layers):

        def forward(
            original: Callable[..., Any],
            *args: Any,
            _i: int = index,
            _l: nn.Module = layer,
            **kw: Any,
        ) -> Any:
            call = CURRENT.get()
            if call is None:
                state = cache_state(find_cache(kw))
                if state is not None and _i >= state.layer:
                    raise _orphan_cache_error(patch.adapter_name, _i)
                return original(*args, **kw)
            if call.image_mask is None and call.state is not None:  # decode
                layers = [stage.layer for stage in call.state.stages]
            else:
                layers = [layer for layer, _ in call.settings.schedule]
            if _i == 0 and call.image_mask is not None and call.settings.rank == "raters":
                hidden_in = args[0] if args else kw["hidden_states"]
                valid = call.mask2d.bool() if call.mask2d is not None else None
                if valid is None:
                    valid = torch.ones_like(call.image_mask)
                call.raters = select_raters(hidden_in, valid, call.image_mask)
            stage = _stage_of(layers, _i)
            if stage < 0:
                return original(*args, **kw)
            hidden = args[0] if args else kw.pop("hidden_states")
            args = args[1:]
            if call.image_mask is not None:  # prefill
                if _i == layers[stage]:
                    hidden = reduce_at_layer(call, _l, hidden, kw, stage)
            elif call.kwargs_stage != stage:  # decode: a stage's first layer builds its mask
                call.layer_kwargs = decode_kwargs(call, hidden.shape[1], hidden.dtype, stage)
                call.kwargs_stage = stage
            kw.update(call.layer_kwargs or {})
            return original(hidden, *args, **kw)

        patch.override(layer, "forward", forward)


def bind_arguments(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """A call's arguments by name (positional ones bound to ``fn``'s signature)."""
    bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    extra = bound.pop("kwargs", {})
    return {**bound, **extra}


def start_call(
    settings: LLMReduction,
    named: Mapping[str, Any],
    image_mask: torch.Tensor | None,
    language_config: Any,
) -> LLMCall | None:
    """The :class:`LLMCall` of one decoder-model forward, or None (run it unchanged).

    Args:
        settings: the patch's LLM-mode settings (used by a prefill).
        named: the forward's arguments by name (the KV cache is found among them by its
            type, the 2-D padding mask as ``attention_mask``).
        image_mask: ``(B, N)`` image positions when LLM mode is active for this call
            and the positions are known; None otherwise.
        language_config: the decoder's config (its attention implementation is checked).

    A decode step after an LLM-mode prefill (its cache carries the state) always
    continues on the reduced cache, whatever mode is active now.
    """
    cache = find_cache(named)
    mask2d = named.get("attention_mask")
    if not isinstance(mask2d, torch.Tensor) or mask2d.dim() != 2:
        mask2d = None  # absent, 4-D, or the per-layer-type dict generate builds for static caches
    state = cache_state(cache)
    cached = cache.get_seq_length() if cache is not None else 0
    if state is not None and cached > 0:  # decoding after an LLM-mode prefill
        return LLMCall(settings, None, mask2d, cache, state=state)
    if image_mask is None or cached > 0 or not bool(image_mask.any()):
        return None
    implementation = str(getattr(language_config, "_attn_implementation", None) or "")
    if implementation.startswith("flash") or implementation == "flex_attention":
        raise ValueError(
            f"llm mode needs an attention that takes a 4-D additive mask (sdpa or eager); "
            f"the language model uses {implementation!r}"
        )
    return LLMCall(settings, image_mask, mask2d, cache)


def forward_in_call(
    call: LLMCall | None, original: Callable[..., Any], named: dict[str, Any]
) -> Any:
    """``original(**named)`` with ``call`` active; a prefill leaves its state on the cache."""
    if call is None:
        return original(**named)
    token = CURRENT.set(call)
    try:
        output = original(**named)
    finally:
        CURRENT.reset(token)
    if call.image_mask is not None and call.state is not None:
        cache = find_cache(named)
        set_cache_state(cache if cache is not None else find_cache(output), call.state)
    return output
