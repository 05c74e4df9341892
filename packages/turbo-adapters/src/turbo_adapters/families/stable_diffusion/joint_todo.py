"""ToDo on a joint (MMDiT) attention: SD3 / SD3.5, FLUX double and single blocks.

Every query, text and image, attends to the keys and values of ``[all text tokens; the
image tokens downsampled on the latent grid by todo_factor]`` (in the model's own
order: ``[image; text]`` in SD3's ``JointAttnProcessor2_0``, ``[text; image]`` in
FLUX's ``FluxAttnProcessor``). The text is never downsampled. SD3.5's image-only
``attn2`` attends to the downsampled image alone, as PixArt's self-attention does.

What is downsampled is the attention's input (the normed image tokens), as on PixArt
(:func:`.methods.todo_downsample`: the same grid, the same ``ceil(side / factor)`` rule
on a side the factor does not divide):

- ``"nearest-exact"`` picks real tokens: the rows of the image tokens are selected
  before the key and value projections (the projection of a selected row is the
  selected row of the projection; the projection runs on ``N / factor^2`` rows). On
  FLUX the keys' rotary rows follow: the text's rows, then the selected image tokens'
  own rows of the ``(cos, sin)`` tables; the queries keep every row.
- ``"avg"`` averages each window of the attention's input, then projects (a linear
  projection of the mean is the mean of the projections) and applies the key norm.
  It runs on SD3 / SD3.5, which have no rotary embedding. An averaged token has no
  single rotary position: on FLUX ``todo_mode="avg"`` is refused (by the DiT adapter,
  at ``apply`` and ``configure``), never given a made-up position.

Mechanism: :class:`ToDoJointProcessor` wraps the attention's own processor (only
diffusers' ``JointAttnProcessor2_0`` and ``FluxAttnProcessor``, whose steps it follows:
projections, per-head norms, the text's ``add_*`` projections and norms, the
concatenation order, rotary embedding, output projections). Turbo's slot hook passes it
a :class:`JointToDo` as the keyword ``turbo_todo``; a call without one runs the wrapped
processor itself (bit for bit what the model computes unpatched). The hooks put the
wrapper on at the first call that needs it and take it off at ``remove()`` (the
original processor object back on its module).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .methods import ToDoPlan, todo_downsample

__all__ = [
    "JOINT_PROCESSORS",
    "JointToDo",
    "ToDoJointProcessor",
    "joint_todo_refusal",
    "todo_rows",
]

#: the diffusers processors whose computation :class:`ToDoJointProcessor` follows
JOINT_PROCESSORS = ("JointAttnProcessor2_0", "FluxAttnProcessor")
#: attributes diffusers sets on a processor, set on the wrapped one
_FORWARDED = ("_attention_backend", "_parallel_config")


@dataclasses.dataclass(frozen=True)
class JointToDo:
    """What one joint-attention call downsamples.

    Attributes:
        plan: the image grid, factor and mode (:class:`.methods.ToDoPlan`).
        prefix: text tokens before the image in the one sequence the attention gets
            (FLUX single blocks: ``[text; image]``); 0 when the text comes apart
            (``encoder_hidden_states``) or there is none.
    """

    plan: ToDoPlan
    prefix: int = 0


@functools.lru_cache(maxsize=64)
def _rows(height: int, width: int, factor: int) -> torch.Tensor:
    ids = torch.arange(height * width, dtype=torch.float64).view(1, -1, 1)
    return todo_downsample(ids, height, width, factor, "nearest-exact")[0, :, 0].long()


def todo_rows(plan: ToDoPlan, device: torch.device) -> torch.Tensor:
    """``(N',)`` indices of the image tokens ``"nearest-exact"`` keeps (raster order):
    the tokens :func:`.methods.todo_downsample` reads, found by downsampling the ids."""
    return _rows(plan.height, plan.width, plan.factor).to(device)


def _original_name(processor: Any) -> str:
    if isinstance(processor, ToDoJointProcessor):
        processor = processor.original
    return type(processor).__name__


def joint_todo_refusal(attn: nn.Module, todo: JointToDo, rotary: Any, num_text: int) -> str | None:
    """Why ToDo cannot run on this joint attention call (``num_text`` text tokens beside
    the plan's image tokens), or None when it can."""
    processor = getattr(attn, "processor", None)
    name = _original_name(processor)
    if name not in JOINT_PROCESSORS:
        return (
            f"ToDo on a joint attention follows {' / '.join(JOINT_PROCESSORS)}; this "
            f"attention runs {name}"
        )
    original = processor.original if isinstance(processor, ToDoJointProcessor) else processor
    if getattr(original, "_attention_backend", None) is not None:
        return "the attention runs a chosen attention backend (ToDo computes with SDPA)"
    if getattr(original, "_parallel_config", None) is not None:
        return "the attention runs context parallel (ToDo computes on the whole sequence)"
    if rotary is not None and todo.plan.mode != "nearest-exact":
        return "todo_mode='avg' on a rotary attention (an averaged token has no position)"
    if rotary is None:
        return None
    if not (isinstance(rotary, (tuple, list)) and len(rotary) == 2):
        return "rotary tables are not a (cos, sin) pair"
    rows = num_text + todo.plan.num_tokens
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == rows for t in rotary):
        return f"rotary tables do not have one row per token of the {rows}-token sequence"
    return None


class ToDoJointProcessor:
    """A joint attention's processor with ToDo's key/value downsampling (module docstring).

    Args:
        original: the processor it wraps (diffusers' ``JointAttnProcessor2_0`` or
            ``FluxAttnProcessor``); calls without ``turbo_todo`` run it unchanged.
    """

    def __init__(self, original: Any) -> None:
        name = type(original).__name__
        if name not in JOINT_PROCESSORS:
            raise TypeError(f"ToDoJointProcessor wraps {' or '.join(JOINT_PROCESSORS)}, got {name}")
        self.original = original
        self.flux = name == "FluxAttnProcessor"

    def __repr__(self) -> str:
        return f"ToDoJointProcessor({type(self.original).__name__})"

    # diffusers' ``set_attention_backend`` (and context parallelism) set these on every
    # processor that has them: they reach the wrapped processor, which keeps them after
    # ``remove``; while one is set, ToDo passes the call through and says why
    def __getattr__(self, name: str) -> Any:
        if name == "original":
            raise AttributeError(name)
        return getattr(self.original, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FORWARDED:
            setattr(self.original, name, value)
        else:
            object.__setattr__(self, name, value)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        turbo_todo: JointToDo | None = None,
    ) -> Any:
        if turbo_todo is None:
            extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, **extra
            )
        if attention_mask is not None:
            raise ValueError("ToDo on a joint attention takes no attention_mask")
        if image_rotary_emb is not None and turbo_todo.plan.mode != "nearest-exact":
            raise ValueError(
                "todo_mode='avg' on a rotary attention: an averaged token has no single "
                "rotary position; use todo_mode='nearest-exact'"
            )
        return self._todo(attn, hidden_states, encoder_hidden_states, image_rotary_emb, turbo_todo)

    # ------------------------------------------------------------------ ToDo
    def _todo(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        text: torch.Tensor | None,
        rotary: Any,
        todo: JointToDo,
    ) -> Any:
        plan, prefix = todo.plan, todo.prefix
        image = hidden_states[:, prefix:]
        num_image = image.shape[1]
        if num_image != plan.height * plan.width:
            raise ValueError(
                f"ToDo: {num_image} image tokens where the grid is {plan.height}x{plan.width}"
            )
        rows = todo_rows(plan, image.device) if plan.mode == "nearest-exact" else None
        fused = self.flux and getattr(attn, "fused_projections", False)
        # the image stream (and, in a one-sequence call, the text prefix beside it)
        if fused:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            key = torch.cat([key[:, :prefix], self._down(key[:, prefix:], plan, rows)], 1)
            value = torch.cat([value[:, :prefix], self._down(value[:, prefix:], plan, rows)], 1)
        else:
            small = self._down(image, plan, rows)
            kv_input = torch.cat([hidden_states[:, :prefix], small], 1) if prefix else small
            query = attn.to_q(hidden_states)
            key, value = attn.to_k(kv_input), attn.to_v(kv_input)
        head_dim = attn.head_dim if self.flux else key.shape[-1] // attn.heads
        query, key, value = (t.unflatten(-1, (-1, head_dim)) for t in (query, key, value))
        query, key = _norm(attn, "norm_q", query), _norm(attn, "norm_k", key)
        # the text stream, through its own projections
        num_text = prefix
        if text is not None:
            num_text = text.shape[1]
            if fused:
                tq, tk, tv = attn.to_added_qkv(text).chunk(3, dim=-1)
            else:
                tq, tk, tv = attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)
            tq, tk, tv = (t.unflatten(-1, (-1, head_dim)) for t in (tq, tk, tv))
            tq, tk = _norm(attn, "norm_added_q", tq), _norm(attn, "norm_added_k", tk)
            if self.flux:  # [text; image]
                query, key, value = (torch.cat(p, 1) for p in ((tq, query), (tk, key), (tv, value)))
            else:  # SD3: [image; text]
                query, key, value = (torch.cat(p, 1) for p in ((query, tq), (key, tk), (value, tv)))
        if rotary is not None:
            cos, sin = rotary
            text_rows = torch.arange(num_text, device=cos.device)
            key_rows = torch.cat([text_rows, rows.to(cos.device) + num_text])  # type: ignore[union-attr]
            query = _rotate(query, cos, sin)
            key = _rotate(key, cos.index_select(0, key_rows), sin.index_select(0, key_rows))
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        )
        out = out.transpose(1, 2).flatten(2).to(query.dtype)  # (B, S, H*D)
        if text is None:
            if self.flux:  # FLUX single blocks: no output projection (pre_only)
                return out
            return attn.to_out[1](attn.to_out[0](out))
        if self.flux:
            text_out, image_out = out[:, :num_text], out[:, num_text:]
        else:
            image_out, text_out = out[:, :num_image], out[:, num_image:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        if self.flux or not attn.context_pre_only:
            text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out

    @staticmethod
    def _down(x: torch.Tensor, plan: ToDoPlan, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is not None:
            return x.index_select(1, rows)
        return todo_downsample(x, plan.height, plan.width, plan.factor, plan.mode)


def _norm(attn: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The attention's per-head norm ``name`` over the last dimension (None: none)."""
    norm = getattr(attn, name, None)
    return norm(x) if norm is not None else x


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary embedding of ``(B, S, H, D)`` rows with ``(S, D)`` tables: channel
    pairs ``(a, b)`` become ``(a cos - b sin, b cos + a sin)``, computed in float32 at
    least and cast back, as diffusers' ``apply_rotary_emb`` does."""
    cos = cos.to(x.device)[None, :, None, :]
    sin = sin.to(x.device)[None, :, None, :]
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack([-odd, even], dim=-1).flatten(3)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)
