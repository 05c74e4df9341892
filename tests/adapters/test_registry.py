"""The adapter registry: names users write, third-party adapters by decorator and entry point."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
from torch import nn

import turbo_adapters as ta
from turbo_adapters import registry

timm = pytest.importorskip("timm")
torchvision_models = pytest.importorskip("torchvision.models")

GLOB_CHARS = set("*?[")


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch):
    """Adapters registered by a test disappear when it ends."""
    registry.list_adapters()  # built-ins and installed entry points first
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))
    return monkeypatch


def test_concrete_names_resolve_to_their_adapter() -> None:
    adapters = ta.list_adapters()
    assert {"timm-vit", "torchvision-vit"} <= set(adapters)
    for name, patterns in adapters.items():
        assert ta.get_adapter(name).name == name
        for pattern in patterns:
            if not GLOB_CHARS & set(pattern):
                assert ta.get_adapter(pattern).name == name, pattern


@pytest.mark.parametrize(
    "model_name",
    [
        "vit_base_patch16_224",
        "deit_small_distilled_patch16_224",
        "vit_base_patch16_224.augreg_in21k_ft_in1k",
        "deit3_small_patch16_224",
        "vit_small_patch14_reg4_dinov2.lvd142m",
        "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "VIT_BASE_PATCH16_224",
    ],
)
def test_timm_names(model_name: str) -> None:
    # the name is one timm knows (pretrained tag and hub prefix stripped)
    assert timm.is_model(model_name.lower().removeprefix("timm/").split(".")[0])
    assert ta.get_adapter(model_name).name == "timm-vit"


def test_every_timm_vision_transformer_name_resolves_to_timm() -> None:
    names = timm.list_models(module=["vision_transformer", "deit"])
    names = [n for n in names if n.startswith(("vit_", "deit", "flexivit", "eva_"))]
    assert len(names) > 100
    assert {ta.get_adapter(n).name for n in names} == {"timm-vit"}


@pytest.mark.parametrize(
    "model_name",
    [
        "vit_b_16",
        "vit_b_32",
        "vit_l_16",
        "vit_l_32",
        "vit_h_14",
        "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1",
        "ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1",
        "ViT_L_16_Weights.DEFAULT",
        "vit_b_16.swag",
        "torchvision/vit_b_16",
    ],
)
def test_torchvision_names(model_name: str) -> None:
    if "_Weights." in model_name:
        torchvision_models.get_weight(model_name)  # a real weights enum member
    else:
        builder = model_name.removeprefix("torchvision/").split(".")[0]
        assert builder in torchvision_models.list_models()
    assert ta.get_adapter(model_name).name == "torchvision-vit"


def test_unknown_name_lists_supported_names() -> None:
    with pytest.raises(KeyError) as info:
        ta.get_adapter("resnet50")
    message = str(info.value)
    assert "resnet50" in message
    for name, patterns in ta.list_adapters().items():
        assert name in message
        assert all(p in message for p in patterns)


def test_model_objects_find_their_adapter() -> None:
    timm_vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4
    )
    tv_vit = torchvision_models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=4, hidden_dim=48, mlp_dim=96
    )
    assert ta.adapter_for_model(timm_vit).name == "timm-vit"
    assert ta.adapter_for_model(tv_vit).name == "torchvision-vit"
    with pytest.raises(TypeError, match="no Turbo adapter recognises"):
        ta.adapter_for_model(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cannot patch"):
        ta.apply(tv_vit, adapter="vit_base_patch16_224")


# ------------------------------------------------------------------- third party
class ToyNet(nn.Module):
    """A one-block toy transformer whose forward reports the Turbo state it runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ToyAdapter:
    name = "toy-net"
    model_names = ("toynet_*",)
    model_types = ("toynet",)
    options: frozenset[str] = frozenset()
    presets = MappingProxyType({})

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ToyNet)

    def patch(self, model, config, explicit=frozenset()):
        # a third-party adapter built from the public pieces: a patch, a site, a wrapper
        patch = ta.TurboPatch(model, self.name)
        site = patch.add_site(ta.ReductionSite("toy", config.replace(protected=1), 1))

        def forward(original, x):
            with site.scope() as call:
                return site.reduce(call, original(x), model)

        patch.override(model, "forward", forward)
        return patch


def test_decorator_registered_adapter_is_found(isolated_registry) -> None:
    assert ta.register_adapter(ToyAdapter) is ToyAdapter
    assert ta.get_adapter("toynet_tiny").name == "toy-net"
    assert ta.get_adapter("toynet").name == "toy-net"  # model_type
    assert "toy-net" in ta.list_adapters()
    model = ToyNet()
    handle = ta.apply(model, r=0)
    assert handle.adapter_name == "toy-net"
    model(torch.randn(2, 3, 4))
    assert handle.last_state.token_counts == [3]
    ta.remove(model)
    assert type(model) is ToyNet
    with pytest.raises(ValueError, match="already registered"):
        ta.register_adapter(ToyAdapter)
    ta.register_adapter(ToyAdapter, replace=True)


class LegacyToyAdapter:
    """A third-party adapter written before adapters declared options and presets."""

    name = "toy-legacy"
    model_names = ("toylegacy_*",)
    model_types = ()

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ToyNet)

    def patch(self, model, config, explicit=frozenset()):
        return ToyAdapter().patch(model, config, explicit)


def test_adapter_declaring_no_options_or_presets_is_taken_as_declaring_none(
    isolated_registry,
) -> None:
    with pytest.warns(DeprecationWarning, match="declares no 'options'"):
        ta.register_adapter(LegacyToyAdapter)
    adapter = ta.get_adapter("toy-legacy")
    assert adapter.options == frozenset() and adapter.presets == {}
    model = ToyNet()
    patch = ta.apply(model, r=0, adapter="toy-legacy")
    model(torch.randn(2, 3, 4))
    assert patch.adapter_name == "toy-net" and patch.last_state.token_counts == [3]
    ta.remove(model)


class ToyAdapterWithOptions(ToyAdapter):
    """An adapter with a setting of its own and a preset of it (as Stable Diffusion's)."""

    name = "toy-options"
    model_names = ("toyoptions_*",)
    model_types = ()
    options = frozenset({"stride"})
    presets = MappingProxyType({"toy-fast": {"stride": 2, "r": 1}})

    def patch(self, model, config, explicit=frozenset(), **options):
        patch = super().patch(model, config, explicit)
        patch.toy_options = options
        return patch


def test_apply_hands_the_declared_options_and_presets_to_the_adapter(isolated_registry) -> None:
    ta.register_adapter(ToyAdapterWithOptions)
    model = ToyNet()
    patch = ta.apply(model, "toy-fast", adapter="toy-options")
    try:
        assert patch.toy_options == {"stride": 2}  # the preset's own setting, not the config's
        assert patch.sites["toy"].config.r == 1  # the preset's config field
    finally:
        ta.remove(model)
    patch = ta.apply(model, "toy-fast", adapter="toy-options", stride=3)  # keyword beats preset
    assert patch.toy_options == {"stride": 3}
    ta.remove(model)
    with pytest.raises(TypeError, match="unknown TurboConfig field"):
        ta.apply(model, adapter="toy-options", strides=3)  # not declared: refused, not dropped


def test_a_family_adapter_takes_no_options_it_does_not_declare() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2)
    adapter = ta.get_adapter("timm-vit")
    assert adapter.options == frozenset() and dict(adapter.presets) == {}
    with pytest.raises(TypeError, match="adapter 'timm-vit' takes no options; got \\['stride'\\]"):
        adapter.patch(model, ta.resolve_config(None), stride=2)
    assert ta.handle_of(model) is None


def test_turbo_handle_is_the_deprecated_name_of_turbo_patch() -> None:
    with pytest.warns(DeprecationWarning, match="TurboHandle is TurboPatch's old name"):
        assert ta.TurboHandle is ta.TurboPatch
    from turbo_adapters import patch as patch_module

    with pytest.warns(DeprecationWarning, match="old name"):
        assert patch_module.TurboHandle is ta.TurboPatch
    with pytest.raises(AttributeError, match="no attribute 'TurboHandel'"):
        _ = ta.TurboHandel


def test_incomplete_adapter_is_rejected(isolated_registry) -> None:
    class NoPatch:
        name = "broken"
        model_names = ()
        model_types = ()

        def matches(self, model):
            return False

    with pytest.raises(TypeError, match="patch"):
        ta.register_adapter(NoPatch)


PLUGIN_SOURCE = """
from torch import nn
import turbo_adapters as ta


class {cls}(nn.Module):
    def forward(self, x):
        return x


class _Adapter:
    name = "{name}"
    model_names = ("{pattern}",)
    model_types = ()

    def matches(self, model):
        return isinstance(model, {cls})

    def patch(self, model, config, explicit=frozenset()):
        patch = ta.TurboPatch(model, self.name)
        site = patch.add_site(ta.ReductionSite("toy", config, 1))
        ta.install_scope(patch, site, model)
        return patch


def register():
    ta.register_adapter(_Adapter)
"""


def _write_plugin(root: Path, module: str, cls: str, name: str, pattern: str, register: str):
    body = PLUGIN_SOURCE.format(cls=cls, name=name, pattern=pattern)
    if register == "module":
        body += "\n\nregister()\n"  # registering on import: the entry point names the module
    (root / f"{module}.py").write_text(body)


def test_entry_point_adapters_load(tmp_path: Path, isolated_registry) -> None:
    monkeypatch = isolated_registry
    # entry point 1 names a module that registers on import; 2 names a callable
    _write_plugin(tmp_path, "turbo_plugin_mod", "ModNet", "plugin-mod", "modnet_*", "module")
    _write_plugin(tmp_path, "turbo_plugin_fn", "FnNet", "plugin-fn", "fnnet_*", "callable")
    dist = tmp_path / "turbo_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: turbo-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [turbo_adapters.adapters]
            mod = turbo_plugin_mod
            fn = turbo_plugin_fn:register
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("turbo_plugin_mod", "turbo_plugin_fn"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    importlib.invalidate_caches()
    assert "plugin-mod" not in registry._ADAPTERS
    monkeypatch.setattr(registry, "_loaded", False)

    assert ta.get_adapter("modnet_small").name == "plugin-mod"
    assert ta.get_adapter("fnnet_small").name == "plugin-fn"
    model = sys.modules["turbo_plugin_fn"].FnNet()
    handle = ta.apply(model, r=0)
    assert handle.adapter_name == "plugin-fn"
    model(torch.randn(1, 2, 3))
    assert handle.last_state is not None
    ta.remove(model)
    # loading happens once
    assert registry._loaded is True


def test_family_state_lives_on_its_patch_and_goes_with_remove() -> None:
    """What a family option keeps (BLIP's size-biased cross-attentions, BLIP-2's Q-Former
    wrappers) is per patch, made once, and dropped by remove: never a module global."""
    first, second = ta.TurboPatch(ToyNet(), "toy"), ta.TurboPatch(ToyNet(), "toy")
    made = []

    def make() -> set:
        made.append(1)
        return set()

    kept = first.family_state("biased", make)
    kept.add("attention")
    assert first.family_state("biased", make) is kept and len(made) == 1  # made once
    assert second.family_state("biased", make) == set() and len(made) == 2  # not shared
    first.remove()
    assert first.family_state("biased", make) == set() and len(made) == 3  # gone with remove
    second.remove()
