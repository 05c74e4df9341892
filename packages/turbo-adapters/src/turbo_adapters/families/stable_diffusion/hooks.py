"""Merge-and-restore around the components of every UNet transformer block, by module hooks.

Nothing of the model is replaced: the blocks keep their own forward (every norm type,
GLIGEN, gates, feed-forward chunking) and the attentions keep whatever processor they
have (SDPA, sliced, IP-Adapter, LoRA). Hooks, per denoiser (a UNet or a ControlNet):

- the denoiser's pre-hook opens one call state (latent size, step, seeded generator);
- each ``Transformer2DModel`` 's pre-hook records the exact token grid of its input;
- each ``BasicTransformerBlock`` 's pre-hook plans from the block's input tokens (the
  window matching, with the text's cross-attention map as the semantic value), one plan
  for the three components (ranking the feed-forward's merges on its own input instead
  was measured no closer to the unpatched SD 1.5 UNet: 0.0663 vs 0.0661 at ratio 0.5);
- ``attn1`` / ``attn2`` / ``ff`` pre-hooks merge their (normed) input, their forward
  hooks restore the output to full length and original order, before the gate and the
  residual. A call whose input does not match the plan (a self-attention mask, IP-Adapter
  masks per position, a chunk of a chunked feed-forward) passes through unmerged and is
  counted in the stats.

Diffusion transformers (:mod:`.layout` maps their blocks onto the same slots): a joint
(MMDiT) block with the semantic term on is planned at its first slot call instead of
its pre-hook, since the text's attention over the image
(:func:`.guide.joint_text_attention`) needs the normed streams the attention receives.
Under FLUX's rotary embedding, batch rows whose plans keep different tokens need
different rows of the one ``(cos, sin)`` table the processor applies to the whole
batch: the attention runs once per group of rows sharing their kept tokens (the hooked
call takes the first group, the restore hook calls the module's ``forward`` for the
others and puts the rows back in order).

ToDo (``method="todo"``) keeps every query, so nothing is restored: a self-attention
(``attn1`` of a BasicTransformerBlock) gets the downsampled grid as its keys and values
(``encoder_hidden_states``); a joint attention computes its keys and values inside its
processor, so its slot hook puts :class:`.joint_todo.ToDoJointProcessor` around that
processor (at the first call that needs it; ``remove`` takes it off) and passes the
plan as the keyword ``turbo_todo``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import itertools
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from turbo_core import MergePlan, score_windows, size_log_bias, window_destinations

from ...blocks import TurboBypassWarning
from .guide import joint_text_attention, text_to_image_attention, text_token_mask
from .joint_todo import JointToDo, ToDoJointProcessor, joint_todo_refusal
from .layout import Slot, block_slots, model_grid
from .methods import SoftPlan, ToDoPlan, soft_plan
from .settings import COMPONENTS, SDSettings

if TYPE_CHECKING:
    from ...site import ReductionSite, SiteCall
    from .adapter import StableDiffusionPatch

__all__ = ["CallStats", "DenoiserHooks", "RatioClippedWarning"]

_ids = itertools.count()


class RatioClippedWarning(UserWarning):
    """A ratio asked for more tokens than the windows of a block allow."""


@dataclasses.dataclass
class CallStats:
    """What one denoiser call did (``patch.last_stats``).

    Attributes:
        step: the denoising step index (counted per generation).
        merging: whether this step merges at all (the ``steps`` switch).
        merged: ``{component: number of calls merged}``.
        tokens: ``[(block, N, {component: r})]`` per planned block.
        passed: ``[(block, component, reason)]`` calls that ran unmerged.
        clipped: ``[(block, component, asked_r, applied_r)]`` ratios the windows capped.
    """

    step: int
    merging: bool
    merged: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))
    tokens: list[tuple[str, int, dict[str, int]]] = dataclasses.field(default_factory=list)
    passed: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    clipped: list[tuple[str, str, int, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Split:
    """A call whose batch rows need different rotary rows, run one group of rows at a
    time: the hooked call runs the first group, the restore hook the others."""

    order: torch.Tensor  # (B,) the rows, group after group
    rest: list[tuple[tuple[Any, ...], dict[str, Any]]]  # (args, kwargs) of the other groups


@dataclasses.dataclass
class _Pending:
    """What a slot's forward hook does to the output: gather its row groups, restore."""

    plan: MergePlan | SoftPlan | None  # None: the output stays merged (a chained slot)
    prefix: int = 0
    split: _Split | None = None


@dataclasses.dataclass
class _Deferred:
    """A joint block whose plan waits for its first slot call: the semantic value (the
    text's attention over the image) needs the normed streams the attention receives."""

    block: nn.Module
    name: str
    index: int
    x: torch.Tensor  # the block's input tokens (the redundancy metric)
    dst: torch.Tensor
    wanted: dict[str, int]
    ratios: dict[str, float]
    shared: bool
    kwargs: dict[str, Any]


@dataclasses.dataclass
class _Call:
    site_call: SiteCall
    scope: Any  # the site's scope context manager, left in the exit hook
    settings: SDSettings  # a snapshot: configure() during the call changes nothing
    stats: CallStats
    latent: tuple[int, int]
    generator: torch.Generator | None
    text_mask: torch.Tensor | None
    grid: tuple[int, int] | None = None
    plans: dict[int, dict[str, MergePlan]] = dataclasses.field(default_factory=dict)
    pending: dict[int, _Pending | None] = dataclasses.field(default_factory=dict)
    #: joint blocks planned at their first slot call (semantic value on)
    deferred: dict[int, _Deferred] = dataclasses.field(default_factory=dict)
    #: text tokens before the image tokens in a block's joint sequence (FLUX single blocks)
    text_len: dict[int, int] = dataclasses.field(default_factory=dict)
    #: chained blocks (FLUX single blocks): the one plan of their ``in`` / ``out`` slots
    chained: dict[int, MergePlan | SoftPlan] = dataclasses.field(default_factory=dict)
    #: a chained block's last ``(input, merged input)``: its ``in`` slots share one input
    chain_input: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(
        default_factory=dict
    )
    depth: int = 0


def _first(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
    return args[0] if args else kwargs.get(name)


def _timestep_value(t: Any, needed: bool) -> float | None:
    """The timestep as a float; device tensors are read only when ``needed`` (a sync)."""
    if isinstance(t, (int, float)):
        return float(t)
    if isinstance(t, torch.Tensor) and t.numel() >= 1 and (needed or t.device.type == "cpu"):
        return float(t.reshape(-1)[0])
    return None


class DenoiserHooks:
    """The hooks on one denoiser (``UNet2DConditionModel``, ``ControlNetModel`` ...)."""

    def __init__(
        self, root: nn.Module, owner: StableDiffusionPatch, site: ReductionSite | None = None
    ) -> None:
        self.root = root
        self.owner = owner
        self.site = site
        self._call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
            f"turbo_sd_call_{next(_ids)}", default=None
        )
        self._handles: list[Any] = []
        self._step = 0
        self._last_t: float | None = None
        self.slots: dict[int, tuple[Slot, ...]] = {}
        self.blocks: list[tuple[str, nn.Module]] = []
        for name, m in root.named_modules():
            slots = block_slots(m)
            if slots:
                self.blocks.append((name, m))
                self.slots[id(m)] = slots
        self.transformers = [m for m in root.modules() if _is_transformer_2d(m)]
        #: (block id, slot attribute) -> (the hooked sub-module, its hook handles)
        self._slot_hooks: dict[tuple[int, str], tuple[nn.Module, list[Any]]] = {}
        #: joint attentions running ToDo: id -> (attention, its own processor, the wrapper)
        self._processors: dict[int, tuple[nn.Module, Any, ToDoJointProcessor]] = {}

    # ----------------------------------------------------------------- install
    def install(self) -> None:
        if not self.blocks:
            raise TypeError(
                f"{type(self.root).__name__} has no transformer blocks Turbo merges in "
                "(diffusers BasicTransformerBlock, JointTransformerBlock, FluxTransformerBlock, "
                "FluxSingleTransformerBlock)"
            )
        add = self._handles.append
        add(self.root.register_forward_pre_hook(self._enter, with_kwargs=True))
        add(self.root.register_forward_hook(self._exit, always_call=True))
        for module in self.transformers:
            add(module.register_forward_pre_hook(self._grid, with_kwargs=True))
        for index, (name, block) in enumerate(self.blocks):
            plan_hook = functools.partial(self._plan, name=name, index=index)
            add(block.register_forward_pre_hook(plan_hook, with_kwargs=True))
            add(block.register_forward_hook(self._block_done, always_call=True))
            for slot in self.slots[id(block)]:
                self._hook_slot(block, name, slot)

    def _hook_slot(self, block: nn.Module, name: str, slot: Slot) -> None:
        """Merge and restore hooks on the sub-module ``block.<slot.module>`` holds now."""
        module = getattr(block, slot.module)
        key = dict(block=id(block), name=name, slot=slot)
        handles = [
            module.register_forward_pre_hook(
                functools.partial(self._merge, **key), with_kwargs=True
            ),
            module.register_forward_hook(
                functools.partial(self._restore, key=id(module)), always_call=True
            ),
        ]
        self._handles.extend(handles)
        self._slot_hooks[(id(block), slot.module)] = (module, handles)

    def _follow_replacements(self, block: nn.Module, name: str) -> None:
        """Move a slot's hooks to a sub-module replaced after ``apply`` (peft wraps a
        ``Linear`` it adapts: hooks left on the wrapped layer would merge its base
        branch alone and the LoRA branch would get the full sequence)."""
        for slot in self.slots[id(block)]:
            hooked, handles = self._slot_hooks[(id(block), slot.module)]
            if getattr(block, slot.module) is not hooked:
                for handle in handles:
                    handle.remove()
                self._hook_slot(block, name, slot)

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        self._slot_hooks.clear()
        for module, original, wrapper in self._processors.values():
            if module.processor is wrapper:  # a processor set since by the user stays
                module.processor = original
        self._processors.clear()

    def _todo_processor(self, module: nn.Module) -> None:
        """Put :class:`.joint_todo.ToDoJointProcessor` around ``module`` 's processor
        (once; again if the processor was replaced since); ``remove`` takes it off."""
        current = module.processor
        if isinstance(current, ToDoJointProcessor):
            return
        wrapper = ToDoJointProcessor(current)
        module.processor = wrapper
        self._processors[id(module)] = (module, current, wrapper)

    @property
    def handles(self) -> list[Any]:
        """The torch hook handles (``handle.remove()`` undoes one)."""
        return list(self._handles)

    def new_generation(self) -> None:
        """Count steps from 0 again (a pipeline call starts)."""
        self._step = 0
        self._last_t = None

    # ------------------------------------------------------------------- hooks
    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        active = self._call.get()
        if active is not None:
            active.depth += 1
            return
        assert self.site is not None, "install the hooks through a StableDiffusionPatch"
        settings = self.owner.settings
        sample = _first(args, kwargs, "sample")
        if sample is None:
            sample = kwargs.get("hidden_states")
        t = args[1] if len(args) > 1 and self.transformers else kwargs.get("timestep")
        t_value = _timestep_value(t, needed=settings.steps is not None)
        if t_value is not None and self._last_t is not None and t_value > self._last_t:
            self.new_generation()  # timesteps fall within a generation; a rise starts one
        step = self._step
        self._step += 1
        self._last_t = t_value
        merging = settings.active and settings.merges_step(step, t_value)
        generator = None
        if merging and settings.use_rand:
            generator = torch.Generator().manual_seed(settings.seed + step)
        text_mask = kwargs.get("encoder_attention_mask")
        if text_mask is None:
            text_mask = self.owner.text_mask
        latent = tuple(sample.shape[-2:]) if isinstance(sample, torch.Tensor) else (0, 0)
        # a diffusion transformer patchifies its input once: its grid is the model's,
        # found from the model's own config and inputs (not from a Transformer2DModel)
        grid = None if self.transformers else model_grid(module, sample, kwargs)
        if grid is not None:
            latent = grid
        scope = self.site.scope()
        site_call = scope.__enter__()
        stats = CallStats(step, merging)
        site_call.state.extras["stats"] = stats
        call = _Call(site_call, scope, settings, stats, latent, generator, text_mask)  # type: ignore[arg-type]
        call.grid = grid
        call.depth = 1
        self._call.set(call)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        call = self._call.get()
        if call is None:
            return
        call.depth -= 1
        if call.depth == 0:
            self._call.set(None)
            call.scope.__exit__(None, None, None)
            stats = call.stats
            if stats.merging and not any(stats.merged.values()):
                reasons = sorted({reason for _, _, reason in stats.passed})
                if call.grid is None:
                    reasons.append("no token grid was found for this call")
                warnings.warn(
                    f"Turbo: nothing was merged in this {type(module).__name__} call although "
                    f"the settings merge ({', '.join(reasons) or 'no block matched the settings'}"
                    "; see patch.last_stats)",
                    TurboBypassWarning,
                    stacklevel=2,
                )

    def _grid(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = self._call.get()
        if call is None:
            return
        x = _first(args, kwargs, "hidden_states")
        call.grid = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None  # type: ignore[assignment]

    def _plan(
        self,
        block: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        name: str,
        index: int,
    ) -> None:
        self._follow_replacements(block, name)
        call = self._call.get()
        if call is None or not call.stats.merging or call.grid is None:
            return
        settings, config = call.settings, call.site_call.reducer.config
        x = _first(args, kwargs, "hidden_states")
        text = kwargs.get("encoder_hidden_states")
        if isinstance(text, torch.Tensor) and text.dim() == 3:
            call.text_len[id(block)] = text.shape[1]
        height, width = call.grid
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != height * width:
            call.stats.passed.append((name, "block", "input is not the grid's token sequence"))
            return
        downsample = call.latent[0] // height
        if call.latent[0] % height or downsample > settings.max_downsample:
            return
        ratios = settings.ratios_at(downsample)
        if width < settings.sx or height < settings.sy:
            call.stats.passed.append((name, "block", "grid smaller than one window"))
            return
        num_tokens = x.shape[1]
        present = {slot.component for slot in self.slots[id(block)]}
        wanted = {
            c: int(num_tokens * ratio) for c, ratio in ratios.items() if ratio > 0 and c in present
        }
        wanted = {c: r for c, r in wanted.items() if r > 0}
        if not wanted:
            return
        batch = x.shape[0]
        if settings.method != "turbo":
            peer = self._peer_plans(x, wanted, (height, width), settings, batch)
            call.plans[id(block)] = peer  # type: ignore[assignment]
            call.stats.tokens.append((name, num_tokens, {c: p.r for c, p in peer.items()}))
            self._chain(block, peer, kwargs, call)  # type: ignore[arg-type]
            return
        dst = window_destinations(height, width, settings.sx, settings.sy, call.generator)
        # one plan from the conditional half, followed by both halves: half the matching
        shared = settings.plan_from == "cond" and batch % 2 == 0 and self.owner.cfg_halves(batch)
        semantic = None
        if config.uses_semantics and _cross_attention(block) is not None:
            semantic = self._semantic(block, x, kwargs, call, shared)
        elif config.uses_semantics and type(block).__name__ in _JOINT_BLOCKS:
            # the text's attention over the image needs the normed streams the joint
            # attention receives: plan at the block's first slot call
            deferred = _Deferred(block, name, index, x, dst, wanted, ratios, shared, kwargs)
            call.deferred[id(block)] = deferred
            return
        self._finish_plan(
            call, block, name, index, x, dst, semantic, shared, wanted, ratios, kwargs
        )

    def _finish_plan(
        self,
        call: _Call,
        block: nn.Module,
        name: str,
        index: int,
        x: torch.Tensor,
        dst: torch.Tensor,
        semantic: torch.Tensor | None,
        shared: bool,
        wanted: dict[str, int],
        ratios: dict[str, float],
        kwargs: dict[str, Any],
    ) -> None:
        """Rank the block's tokens, cut one plan per ratio, chain the block if it can."""
        settings, config = call.settings, call.site_call.reducer.config
        batch, num_tokens = x.shape[:2]
        scores = score_windows(x[batch // 2 :] if shared else x, dst, semantic, config, index)
        plans: dict[int, MergePlan] = {}
        chosen: dict[str, MergePlan] = {}
        for component, r in wanted.items():
            if r > scores.max_r:
                call.stats.clipped.append((name, component, r, scores.max_r))
                warnings.warn(
                    f"{name}.{component}: ratio {ratios[component]} asks for {r} of "
                    f"{num_tokens} tokens but {settings.sy}x{settings.sx} windows allow "
                    f"{scores.max_r}; merging {scores.max_r} (see patch.last_stats.clipped)",
                    RatioClippedWarning,
                    stacklevel=2,
                )
                r = scores.max_r
            if r not in plans:
                plans[r] = _both_halves(scores.plan(r)) if shared else scores.plan(r)
            chosen[component] = plans[r]
        call.plans[id(block)] = chosen
        call.stats.tokens.append((name, num_tokens, {c: p.r for c, p in chosen.items()}))
        self._chain(block, chosen, kwargs, call)

    def _chain(
        self,
        block: nn.Module,
        chosen: dict[str, MergePlan | SoftPlan],
        kwargs: dict[str, Any],
        call: _Call,
    ) -> None:
        """Chain ``block`` (merge once, restore once) when its slots allow it: every
        chained slot follows one plan and none of them would pass through unmerged."""
        slots = [s for s in self.slots[id(block)] if s.chain]
        if not slots:
            return
        plans = {id(chosen.get(s.component)) for s in slots}
        plan = chosen.get(slots[0].component)
        if plan is None or len(plans) != 1:
            return  # different ratios per component: each slot merges and restores apart
        extra = kwargs.get("joint_attention_kwargs") or {}
        if extra.get("attention_mask") is not None or extra.get("ip_adapter_masks") is not None:
            return
        call.chained[id(block)] = plan

    def _peer_plans(
        self,
        x: torch.Tensor,
        wanted: dict[str, int],
        grid: tuple[int, int],
        settings: SDSettings,
        batch: int,
    ) -> dict[str, ToDoPlan | SoftPlan]:
        """ToDo's key/value grid (``attn1``: self- or joint attention) or ToMA's soft plans."""
        if settings.method == "todo":
            if "attn1" not in wanted:
                return {}
            plan = ToDoPlan(*grid, settings.todo_factor, settings.todo_mode, batch, x.shape[1])
            return {"attn1": plan}
        shared = settings.plan_from == "cond" and batch % 2 == 0 and self.owner.cfg_halves(batch)
        rows = x[batch // 2 :] if shared else x
        plans: dict[int, SoftPlan] = {}
        for r in set(wanted.values()):
            plan = soft_plan(rows, x.shape[1] - r, settings.toma_tau, grid, settings.toma_tile)
            if shared:
                plan = SoftPlan(plan.weights.repeat(2, 1, 1), plan.dst_idx.repeat(2, 1))
            plans[r] = plan
        return {c: plans[r] for c, r in wanted.items()}

    def _semantic(
        self,
        block: nn.Module,
        x: torch.Tensor,
        kwargs: dict[str, Any],
        call: _Call,
        shared: bool = False,
    ) -> torch.Tensor | None:
        """``(B, N)`` semantic value of every token; the conditional half's ``(B/2, N)``
        alone when ``shared`` (one plan for both halves)."""
        text = kwargs.get("encoder_hidden_states")
        if isinstance(text, (tuple, list)):  # IP-Adapter: (text, image embeddings)
            text = text[0]
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[0] != x.shape[0]:
            return None
        settings = call.settings
        batch = x.shape[0]
        halves = shared or (
            batch % 2 == 0 and settings.semantic_from == "cond" and self.owner.cfg_halves(batch)
        )
        rows = slice(batch // 2, batch) if halves else slice(0, batch)
        image, text = x[rows], text[rows]
        norm = block.norm2 if isinstance(getattr(block, "norm2", None), nn.LayerNorm) else None
        if norm is None and isinstance(getattr(block, "norm1", None), nn.LayerNorm):
            norm = block.norm1
        if getattr(block, "norm_type", None) == "ada_norm_single":
            norm = None  # PixArt: the cross-attention reads the un-normed tokens
        if norm is not None:
            image = norm(image)
        keep = text_token_mask(image.shape[0], text.shape[1], x.device, call.text_mask)
        semantic = text_to_image_attention(block.attn2, image, text, keep, settings.text_reduce)
        if shared:
            return semantic
        return torch.cat([semantic, semantic]) if halves else semantic

    def _block_done(self, block: nn.Module, args: Any, output: Any) -> None:
        call = self._call.get()
        if call is not None:
            call.plans.pop(id(block), None)
            call.text_len.pop(id(block), None)
            call.chained.pop(id(block), None)
            call.chain_input.pop(id(block), None)
            call.deferred.pop(id(block), None)

    def _merge(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        block: int,
        name: str,
        slot: Slot,
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        call = self._call.get()
        if call is None:
            return None
        component = slot.component
        call.pending[id(module)] = None
        x = _first(args, kwargs, "hidden_states")
        if x is None:
            x = kwargs.get("input")  # nn.Linear called by keyword
        deferred = call.deferred.pop(block, None)
        if deferred is not None:
            self._plan_joint(call, deferred, slot, x, kwargs)
        plan = call.plans.get(block, {}).get(component)
        if plan is None:
            return None
        prefix = call.text_len.get(block, 0) if slot.prefix else 0
        rotary = kwargs.get("image_rotary_emb") if slot.rotary else None
        if slot.chain and call.chained.get(block) is plan:
            return self._chain_merge(
                call, block, module, x, plan, prefix, rotary, args, kwargs, slot
            )
        reason = None
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            reason = "input is not (B, N, C)"
        elif x.shape[:2] != (plan.batch_size, prefix + plan.num_tokens):
            planned = (plan.batch_size, prefix + plan.num_tokens)
            reason = f"input {tuple(x.shape[:2])} is not the planned {planned}"
        elif component == "attn1" and kwargs.get("attention_mask") is not None:
            reason = "self-attention mask over the full sequence"
        elif kwargs.get("ip_adapter_masks") is not None and _takes(module, "ip_adapter_masks"):
            # the processor maps its masks onto the query count as if it were a grid
            reason = "IP-Adapter masks per position"
        elif isinstance(plan, ToDoPlan) and not slot.kv:
            # a joint attention: its own processor, wrapped, downsamples the image keys
            text = kwargs.get("encoder_hidden_states")
            num_text = prefix or (text.shape[1] if isinstance(text, torch.Tensor) else 0)
            todo = JointToDo(plan, prefix)
            reason = joint_todo_refusal(module, todo, kwargs.get("image_rotary_emb"), num_text)
        if reason is not None:
            call.stats.passed.append((name, component, reason))
            return None
        call.stats.merged[component] += 1
        if isinstance(plan, ToDoPlan):  # every query stays: nothing to restore
            if slot.kv:
                return args, {**kwargs, "encoder_hidden_states": plan.keys(x)}
            self._todo_processor(module)
            return args, {**kwargs, "turbo_todo": todo}
        cross = getattr(module, "is_cross_attention", False)
        kv = call.settings.attn1_kv and slot.kv and not isinstance(plan, SoftPlan)
        if component == "attn1" and kv and not cross:
            return self._merge_keys(call, x, plan, args, kwargs)
        merger = call.site_call.reducer.merger

        def merge(tokens: torch.Tensor) -> torch.Tensor:
            if isinstance(plan, SoftPlan):
                return plan.merge(tokens)
            return merger.merge(tokens, plan)[0]

        merged = torch.cat([x[:, :prefix], merge(x[:, prefix:])], 1) if prefix else merge(x)
        pending = _Pending(plan, prefix)
        call.pending[id(module)] = pending
        return _merged_call(pending, merged, plan, x, prefix, rotary, args, kwargs)

    def _plan_joint(
        self,
        call: _Call,
        deferred: _Deferred,
        slot: Slot,
        x: Any,
        kwargs: dict[str, Any],
    ) -> None:
        """Plan a deferred joint block at its first slot call, from the streams it gets."""
        semantic = None
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            semantic = self._joint_semantic(call, deferred, slot, x, kwargs)
        if semantic is None:
            reason = "no text attention over the image for the semantic value"
            call.stats.passed.append((deferred.name, "block", reason))
            return
        self._finish_plan(
            call,
            deferred.block,
            deferred.name,
            deferred.index,
            deferred.x,
            deferred.dst,
            semantic,
            deferred.shared,
            deferred.wanted,
            deferred.ratios,
            deferred.kwargs,
        )

    def _joint_semantic(
        self,
        call: _Call,
        deferred: _Deferred,
        slot: Slot,
        x: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> torch.Tensor | None:
        """``(B, N)`` text-to-image attention of a joint block (the conditional half's
        ``(B/2, N)`` alone when its plan is shared), or None if this call cannot give it.

        The first slot a joint block calls receives the normed streams: the joint
        attention ``attn`` gets the image and the text apart (SD3, FLUX double blocks);
        a FLUX single block's ``proj_mlp`` gets ``[text; image]``, which its ``attn``
        projects with one set of weights.
        """
        block, tokens = deferred.block, deferred.x
        batch, num_image = tokens.shape[:2]
        attn = getattr(block, "attn", None)
        if attn is None or x.shape[0] != batch:
            return None
        if slot.prefix:  # FLUX single block: one [text; image] sequence
            num_text = call.text_len.get(id(block))
            if num_text is None or x.shape[1] != num_text + num_image:
                return None
            text, image, shared = x[:, :num_text], x[:, num_text:], True
            rotary = deferred.kwargs.get("image_rotary_emb")
        elif getattr(block, slot.module, None) is attn:
            text = kwargs.get("encoder_hidden_states")
            if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[0] != batch:
                return None
            if x.shape[1] != num_image:
                return None
            image, shared = x, False
            rotary = kwargs.get("image_rotary_emb")
        else:
            return None
        settings = call.settings
        halves = deferred.shared or (
            batch % 2 == 0 and settings.semantic_from == "cond" and self.owner.cfg_halves(batch)
        )
        rows = slice(batch // 2, batch) if halves else slice(0, batch)
        image, text = image[rows], text[rows]
        keep = _fitting_mask(call.text_mask, image.shape[0], text.shape[1], x.device)
        semantic = joint_text_attention(
            attn,
            image,
            text,
            shared=shared,
            rotary=rotary,
            keep=keep,
            reduce=settings.text_reduce,
        )
        if deferred.shared:
            return semantic
        return torch.cat([semantic, semantic]) if halves else semantic

    def _chain_merge(
        self,
        call: _Call,
        block: int,
        module: nn.Module,
        x: Any,
        plan: MergePlan | SoftPlan,
        prefix: int,
        rotary: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        slot: Slot,
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """A slot of a chained block: ``in`` merges (once per input), ``out`` restores."""
        expected = prefix + (plan.num_tokens if slot.chain == "in" else plan.num_tokens - plan.r)
        if not isinstance(x, torch.Tensor) or x.shape[:2] != (plan.batch_size, expected):
            # the block was chained in its pre-hook: its slots cannot fall back one by one
            raise RuntimeError(
                f"Turbo: {type(module).__name__} of a chained block got "
                f"{getattr(x, 'shape', type(x))} where (B, N) = {(plan.batch_size, expected)} "
                "was planned; the block's forward differs from diffusers' FluxSingleTransformerBlock"
            )
        if slot.chain == "out":
            call.pending[id(module)] = _Pending(plan, prefix)  # restore, nothing to merge
            return None
        call.stats.merged[slot.component] += 1
        cached = call.chain_input.get(block)
        if cached is not None and cached[0] is x:
            merged = cached[1]
        else:
            if isinstance(plan, SoftPlan):
                image = plan.merge(x[:, prefix:])
            else:
                image = call.site_call.reducer.merger.merge(x[:, prefix:], plan)[0]
            merged = torch.cat([x[:, :prefix], image], 1) if prefix else image
            call.chain_input[block] = (x, merged)
        pending = _Pending(None, prefix)  # the output stays merged (``out`` restores)
        call.pending[id(module)] = pending
        return _merged_call(pending, merged, plan, x, prefix, rotary, args, kwargs)

    def _merge_keys(
        self,
        call: _Call,
        x: torch.Tensor,
        plan: MergePlan,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Self-attention over merged keys/values; the queries stay, so no restore."""
        reducer = call.site_call.reducer
        merged, size = reducer.merger.merge(x, plan)
        kwargs = {**kwargs, "encoder_hidden_states": merged}
        if reducer.config.prop_attn and size is not None:
            kwargs["attention_mask"] = size_log_bias(size, x.dtype).squeeze(1)  # (B, 1, N')
        return args, kwargs

    def _restore(self, module: nn.Module, args: Any, output: Any, *, key: int) -> Any:
        call = self._call.get()
        if call is None:
            return None
        pending = call.pending.pop(key, None)
        if pending is None:
            return None
        if pending.split is not None:
            # the other row groups, each with its own rotary rows (this module's own
            # forward: its hooks, Turbo's included, ran once for the whole call)
            outputs = [output] + [module.forward(*a, **k) for a, k in pending.split.rest]
            output = _gather_rows(outputs, pending.split.order)
        plan, prefix = pending.plan, pending.prefix
        if plan is None:
            return output
        restorer = call.site_call.reducer.restorer

        def restore(tokens: torch.Tensor) -> torch.Tensor:
            if isinstance(plan, SoftPlan):
                return plan.restore(tokens)
            return restorer.restore(tokens, plan)

        def restore_image(tokens: torch.Tensor) -> torch.Tensor:
            if prefix:
                return torch.cat([tokens[:, :prefix], restore(tokens[:, prefix:])], 1)
            return restore(tokens)

        if not isinstance(output, tuple):
            return restore_image(output)
        # joint attention returns (image, text), only the image part was merged; FLUX's
        # IP-Adapter processor adds a third output, its image tokens' attention to the
        # reference image, as merged as its queries were: restored alike
        merged_len = prefix + plan.num_tokens - plan.r
        extra = [
            restore_image(t) if isinstance(t, torch.Tensor) and t.dim() == 3
            and t.shape[1] == merged_len else t
            for t in output[2:]
        ]  # fmt: skip
        return (restore_image(output[0]), *output[1:2], *extra)


#: diffusers' blocks with one joint attention over ``[text; image]`` (MMDiT)
_JOINT_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def _fitting_mask(
    mask: torch.Tensor | None, batch: int, num_text: int, device: torch.device
) -> torch.Tensor | None:
    """``(B, T)`` bool keep mask from the prompts' mask when it fits the text, else None."""
    if mask is None or mask.dim() != 2 or mask.shape[-1] != num_text:
        return None
    if mask.shape[0] not in (1, batch):
        return None
    return (mask.to(device) > 0).expand(batch, -1)


def _merged_call(
    pending: _Pending,
    merged: torch.Tensor,
    plan: MergePlan | SoftPlan,
    x: torch.Tensor,
    prefix: int,
    rotary: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The slot's call on its merged input; with rotary rows, rows whose plans keep
    different tokens run group by group (each group its own rows of the table): the
    hooked call takes the first group, ``pending.split`` holds the others."""
    if args:
        args = (merged, *args[1:])
    else:
        key = "hidden_states" if "hidden_states" in kwargs else "input"
        kwargs = {**kwargs, key: merged}
    if rotary is None:
        return args, kwargs
    groups = _row_groups(plan)
    if len(groups) == 1:
        return args, {**kwargs, "image_rotary_emb": _rotary_rows(rotary, plan, x, prefix, kwargs)}
    batch = merged.shape[0]
    calls = []
    for rows in groups:
        table = _rotary_rows(rotary, plan, x, prefix, kwargs, row=int(rows[0]))
        group_kwargs = {k: _take_rows(v, rows, batch) for k, v in kwargs.items()}
        group_kwargs["image_rotary_emb"] = table
        calls.append((_take_rows(args, rows, batch), group_kwargs))
    pending.split = _Split(torch.cat(groups), calls[1:])
    return calls[0]


def _row_groups(plan: MergePlan | SoftPlan) -> list[torch.Tensor]:
    """Rows of the batch grouped by the tokens their plan keeps as slot seeds (rows of
    a group share their rotary rows); the group of row 0 first."""
    seeds = plan.dst_idx if isinstance(plan, SoftPlan) else plan.kept_idx
    if seeds.shape[0] == 1:
        return [torch.zeros(1, dtype=torch.long)]
    inverse = torch.unique(seeds, dim=0, return_inverse=True)[1]
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(inverse.tolist()):
        groups.setdefault(group, []).append(row)
    return [torch.tensor(rows) for rows in groups.values()]


def _take_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` (a tensor, or lists / tuples / dicts of them) at batch ``rows``; tensors
    whose first dimension is not the batch stay whole."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, (list, tuple)):
        return type(value)([_take_rows(v, rows, batch) for v in value])
    if isinstance(value, dict):
        return {k: _take_rows(v, rows, batch) for k, v in value.items()}
    return value


def _gather_rows(outputs: list[Any], order: torch.Tensor) -> Any:
    """The groups' outputs put back in batch order (``order``: the rows, group by group)."""
    first = outputs[0]
    if isinstance(first, tuple):
        return tuple(_gather_rows([o[i] for o in outputs], order) for i in range(len(first)))
    if not isinstance(first, torch.Tensor):
        return first
    inverse = order.argsort().to(first.device)
    return torch.cat(outputs, dim=0).index_select(0, inverse)


def _rotary_rows(
    rotary: Any,
    plan: MergePlan | SoftPlan,
    x: torch.Tensor,
    prefix: int,
    kwargs: dict[str, Any],
    row: int = 0,
) -> Any:
    """The rotary rows of row ``row`` 's merged sequence: the text's rows, then each
    slot's seed token's row (a merged token takes its destination's position; rotated
    keys are never averaged, the rotation applies after the merge)."""
    text = kwargs.get("encoder_hidden_states")
    text_len = prefix or (text.shape[1] if isinstance(text, torch.Tensor) else 0)
    seeds = plan.dst_idx[row] if isinstance(plan, SoftPlan) else plan.kept_idx[row]
    keep = seeds.to(x.device) + text_len
    rows = torch.cat([torch.arange(text_len, device=x.device), keep])

    def pick(table: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, rows.to(table.device))

    if isinstance(rotary, (tuple, list)):
        return type(rotary)(pick(t) for t in rotary)
    return pick(rotary)


def _both_halves(plan: MergePlan) -> MergePlan:
    """The plan of the conditional half, for the ``[unconditional; conditional]`` batch."""
    kept, merged, into = (
        t.repeat(2, 1) for t in (plan.kept_idx, plan.merged_idx, plan.merged_into)
    )
    return MergePlan(kept, merged, into, plan.num_tokens)


def _takes(attention: nn.Module, name: str) -> bool:
    """Whether the attention's processor reads keyword ``name`` (diffusers drops the rest)."""
    processor = getattr(attention, "processor", None)
    if processor is None:
        return False
    return name in inspect.signature(processor.__call__).parameters


def _cross_attention(block: nn.Module) -> nn.Module | None:
    """The block's text cross-attention (``attn2`` of a BasicTransformerBlock), or None."""
    attn2 = getattr(block, "attn2", None)
    return attn2 if getattr(attn2, "is_cross_attention", False) else None


def _is_transformer_2d(module: nn.Module) -> bool:
    return any(cls.__name__ == "Transformer2DModel" for cls in type(module).__mro__)
