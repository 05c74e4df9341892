"""Tower families as declarations: one frozen :class:`TowerFamily` and one generic install.

A family that patches a transformer tower (a stack of layers between an entry call and
its output) differs from the others only in names: which models it answers to, where
its layers are, what its block is called, how many prefix tokens it protects, which
heads average every token. :class:`TowerFamily` holds those names; :class:`TowerAdapter`
reads it and installs, in this order: checks (everything before anything is patched),
the site, the attentions, the block runners, the family's ``prepare`` wrappers, the
entry scopes (around ``prepare``, so those run inside the call), ``finish`` wrappers.

A new family is a declaration and a three-line class::

    MY_TOWER = TowerFamily(
        name="hf-mytower",
        models=("transformers.models.my.modeling_my:MyVisionModel",),
        layers=("transformers.models.my.modeling_my:MyEncoderLayer",),
        block=BlockSpec(norm1="layer_norm1", attn="self_attn", norm2="layer_norm2", mlp="mlp"),
        model_types=("my_vision_model",),
    )

    class MyTowerAdapter(TowerAdapter):
        family = MY_TOWER
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from turbo_core import TurboConfig

from ..adapter import FamilyAdapter, is_model_of, model_defaults, resolve
from ..attention import use_turbo_attention
from ..blocks import BlockSpec, install_blocks, install_scope
from ..patch import TurboPatch
from ..site import ReductionSite
from .hf_base import find_one as find_tower

__all__ = ["Installer", "TowerAdapter", "TowerFamily", "find_tower"]

#: ``installer(patch, site, tower)``: one wrapper a family adds beside the generic ones.
Installer = Callable[[TurboPatch, ReductionSite, nn.Module], None]


@dataclasses.dataclass(frozen=True)
class TowerFamily:
    """What a tower family is, as names; :class:`TowerAdapter` installs from it.

    Class references are ``"module:Class"`` strings, imported only when a model is
    matched or patched (a family never imports its library before the user does).

    Attributes:
        name: the adapter's name (``"hf-clip"``).
        models: the model classes the family patches (the one way it matches a model).
        recognise: for models whose class cannot be named by a module path (LAVIS's
            encoders, loaded from files): ``recognise(model)`` judges by structure.
        block: the layers' :class:`~turbo_adapters.BlockSpec`, or a function of the first
            layer returning it (when the layout depends on the checkpoint).
        model_names: glob patterns of names users write (``"openai/clip-vit-*"``).
        model_types: ``config.model_type`` values.
        tower: classes of the one submodule (or the model itself) holding the layers;
            empty: the model is the tower.
        layers: the layer classes; every layer must be one of them.
        layer_path: dotted path of the layer list inside the tower (``"encoder.layers"``);
            None: every submodule of the tower that is a ``layers`` class, in order.
        attention: classes the layers' attention (``block.attn``) must be; empty: any.
        modality: the site's name (``"vision"``, ``"text"``).
        prefix: tokens in front that never merge (CLS, distillation, registers), or a
            function of the tower; the default of ``protected``.
        guide: ``"cls"`` or ``"mean"``, or a function of the tower.
        restore: model classes whose heads average every token: for them the tower hands
            its tokens back at full length (and the site tracks sources).
        needs_source: a function of the tower: whether the site must track sources.
        attend: ``attend(patch, site, attention)`` puts one attention on Turbo's path;
            None: the block's ``layout`` if it has one, else transformers' attention
            registry (:func:`~turbo_adapters.attention.use_turbo_attention`).
        check: ``check(model, tower, layers)`` raises a TypeError for what the family
            refuses beyond the classes (runs before anything is patched).
        prepare: installers applied after the blocks and before the entry scopes.
        scopes: methods of the tower that open the site's call (those it defines).
        scope_model: also open the call on the model's ``forward`` when the tower is a
            submodule (heads read the sizes from the model's output).
        token_mask: ``token_mask(*args, **kwargs)`` -> ``(B, N)`` padding mask (text).
        finish: installers applied after the entry scopes.
        options: keyword settings of the family's own (see :class:`~turbo_adapters.Adapter`).
        presets: named sets of such settings.
    """

    name: str
    models: tuple[str, ...]
    block: BlockSpec | Callable[[nn.Module], BlockSpec]
    recognise: Callable[[nn.Module], bool] | None = None
    model_names: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    tower: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    layer_path: str | None = None
    attention: tuple[str, ...] = ()
    modality: str = "vision"
    prefix: int | Callable[[nn.Module], int] = 1
    guide: str | Callable[[nn.Module], str] = "cls"
    restore: tuple[str, ...] = ()
    needs_source: Callable[[nn.Module], bool] | None = None
    attend: Callable[[TurboPatch, ReductionSite, nn.Module], None] | None = None
    check: Callable[[nn.Module, nn.Module, list[nn.Module]], None] | None = None
    prepare: tuple[Installer, ...] = ()
    scopes: tuple[str, ...] = ("forward",)
    scope_model: bool = False
    token_mask: Callable[..., torch.Tensor | None] | None = None
    finish: tuple[Installer, ...] = ()
    options: frozenset[str] = frozenset()
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )

    def __post_init__(self) -> None:
        if not self.name or not (self.models or self.recognise):
            raise ValueError("a TowerFamily needs a name and model classes (or recognise)")
        if not self.layers and self.layer_path is None:
            raise ValueError(f"{self.name}: give the layer classes, a layer_path, or both")


def _short(refs: tuple[str, ...]) -> str:
    return " / ".join(ref.rpartition(":")[2] for ref in refs)


class TowerAdapter(FamilyAdapter):
    """The adapter of a declared tower family: set ``family`` on a subclass.

    The subclass's ``name``, ``model_names``, ``model_types``, ``models``, ``options``
    and ``presets`` are the family's.
    """

    family: ClassVar[TowerFamily]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        family = cls.__dict__.get("family")
        if family is not None:
            cls.name = family.name
            cls.model_names = family.model_names
            cls.model_types = family.model_types
            cls.models = family.models
            cls.options = family.options
            cls.presets = family.presets

    def matches(self, model: nn.Module) -> bool:
        recognise = self.family.recognise
        return super().matches(model) or (recognise is not None and recognise(model))

    # ------------------------------------------------------------------ parts
    def find_tower(self, model: nn.Module) -> nn.Module:
        """The submodule holding the layers (the model itself for families without one)."""
        family = self.family
        if not family.tower:
            return model
        return find_tower(model, resolve(family.tower), f"{_short(family.tower)} tower")

    def find_layers(self, tower: nn.Module) -> list[nn.Module]:
        """The layers the site runs over, checked against the declared classes."""
        family = self.family
        classes = resolve(family.layers)
        if family.layer_path is None:
            layers = [m for m in tower.modules() if isinstance(m, classes)]
        else:
            found: Any = tower
            for piece in family.layer_path.split("."):
                found = getattr(found, piece)
            layers = list(found)
        if not layers:
            raise TypeError(f"{family.name} found no transformer layers to patch")
        odd = {
            type(layer).__name__ for layer in layers if classes and not isinstance(layer, classes)
        }
        attention = resolve(family.attention)
        if attention and not odd:
            attn = self.block_spec(layers[0]).attn
            parts = [getattr(layer, attn, None) for layer in layers]
            odd = {type(part).__name__ for part in parts if not isinstance(part, attention)}
        if odd:
            wanted = _short(family.layers) or "its layers"
            if family.attention:
                wanted += f" with {_short(family.attention)}"
            raise TypeError(f"{family.name} supports {wanted}; this model has {sorted(odd)}")
        return layers

    def block_spec(self, first_layer: nn.Module) -> BlockSpec:
        block = self.family.block
        return block if isinstance(block, BlockSpec) else block(first_layer)

    # ---------------------------------------------------------------- install
    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        site = self.install_tower(patch, model, config)
        self.install_entries(patch, model, site)

    def install_tower(
        self, patch: TurboPatch, model: nn.Module, config: TurboConfig
    ) -> ReductionSite:
        """Checks, the site, attentions, block runners and ``prepare``; no entry scopes.

        For models that embed the tower and open the site's call themselves (MiniGPT-v2's
        EVA tower, opened only in tower mode).
        """
        family = self.family
        tower = self.find_tower(model)
        layers = self.find_layers(tower)
        spec = self.block_spec(layers[0])
        for layer in layers:  # everything is checked before anything is patched
            spec.check(layer)
        if family.check is not None:
            family.check(model, tower, layers)
        prefix = family.prefix if isinstance(family.prefix, int) else family.prefix(tower)
        guide = family.guide if isinstance(family.guide, str) else family.guide(tower)
        restores = is_model_of(model, family.restore)
        needs_source = restores or (family.needs_source is not None and family.needs_source(tower))
        site = ReductionSite(
            family.modality,
            model_defaults(config, int(prefix)),
            len(layers),
            guide=guide,
            needs_source=needs_source,
        )
        patch.add_site(site)
        if family.attend is not None:
            for layer in layers:
                family.attend(patch, site, spec.part(layer, spec.attn))
        elif spec.layout is None:  # transformers calls Turbo's registered function
            use_turbo_attention(
                patch, site, [spec.part(layer, spec.owner or spec.attn) for layer in layers]
            )
        install_blocks(patch, site, layers, spec)
        for installer in family.prepare:
            installer(patch, site, tower)
        return site

    def install_entries(self, patch: TurboPatch, model: nn.Module, site: ReductionSite) -> None:
        """The entry scopes (tower, then model) and the ``finish`` wrappers."""
        family = self.family
        tower = self.find_tower(model)
        restores = is_model_of(model, family.restore)
        for name in family.scopes:
            if hasattr(tower, name):
                install_scope(
                    patch, site, tower, name, token_mask=family.token_mask, restore=restores
                )
        if family.scope_model and tower is not model:
            install_scope(patch, site, model)
        for installer in family.finish:
            installer(patch, site, tower)
