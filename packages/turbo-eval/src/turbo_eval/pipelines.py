"""Diffusion pipelines as suite models: loading, each method's settings, generation.

A suite names a pipeline like any model::

    [[models]]
    name = "sd15-random"         # or "sd-tiny", a local diffusers folder, a cached hub id
    r = [30, 50]                 # for a pipeline: the percentage of tokens merged
    merge = ["attn1"]            # the components r applies to (attn1, attn2, ff)
    attn1_kv = true              # any other Stable Diffusion setting, fixed for the sweep
    max_downsample = 2

Nothing is downloaded: a folder or hub id loads with ``local_files_only=True``.
``r`` becomes ``ratio_<component> = r / 100`` for the ``merge`` components, for Turbo's
methods and for tomesd alike (tomesd takes ``ratio``, ``max_downsample``, ``sx``, ``sy``
and ``use_rand``; it has no key/value mode). The other components' ratios are 0 unless
the model fixes them (``ratio_ff = 0.3``); every other setting not given is the
adapter's default for the UNet (see ``turbo_adapters.families.stable_diffusion``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import turbo_adapters

from .loaded_model import LoadedModel
from .names import MODEL_SIDE, MODEL_TURBO_OPTIONS, SIZE_BIAS

__all__ = [
    "PEER",
    "PIPELINE_MODELS",
    "GenerationItem",
    "PipelineModel",
    "is_pipeline_model",
    "load_pipeline_model",
]

#: Pipelines built in code (random weights, nothing to download).
PIPELINE_MODELS = {
    "sd-tiny": "a tiny Stable Diffusion pipeline built in code (tests and smoke runs)",
    "sd15-random": "Stable Diffusion 1.5 at full size with random weights (published configs)",
}
#: The key under which a method's overrides name a peer library instead of Turbo.
PEER = "peer"
COMPONENTS = ("attn1", "attn2", "ff")
_OWN_OPTIONS = ("merge", "pipeline", "dtype", "device", "seed")
#: TurboConfig fields a suite's method may set on a pipeline.
_CONFIG_FIELDS = ("mode", "alpha", "semantic_scale", "fusion", "prop_attn")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class GenerationItem:
    """One image to generate: a prompt, its seed and the call's settings.

    ``image`` (``(3, H, W)`` in [0, 1]) makes it an image-to-image item with ``strength``.
    """

    prompt: str
    seed: int
    steps: int = 20
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    image: torch.Tensor | None = None
    strength: float = 0.6


def _settings_fields() -> frozenset[str]:
    from turbo_adapters.families.stable_diffusion.settings import SDSettings

    return SDSettings.field_names()


def _index_file(name: str) -> Path | None:
    """``model_index.json`` of a local diffusers folder or of a hub id in the local cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        return index if index.is_file() else None
    if "/" not in name:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(name, "model_index.json")
    return Path(cached) if isinstance(cached, str) else None


def is_pipeline_model(name: str) -> bool:
    """Whether ``name`` is a diffusion pipeline: built in, or a folder / cached hub id that
    holds a ``model_index.json``."""
    return name in PIPELINE_MODELS or _index_file(name) is not None


@dataclasses.dataclass
class PipelineModel(LoadedModel):
    """A diffusers pipeline behind the suite's model interface.

    ``module`` is the pipeline; ``set_method`` patches it with Turbo (or tomesd) for a
    method and ``generate`` makes the final latents of :class:`GenerationItem` s.
    """

    merge: tuple[str, ...] = ("attn1",)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    image_to_image: bool = False
    size: int = 512
    peer: str | None = None

    # ------------------------------------------------------------ methods
    @property
    def unpatched(self) -> bool:
        """Neither Turbo nor a peer is on the pipeline."""
        return self.handle is None and self.peer is None

    def side(self, name: str | None) -> Any:
        if name is not None:
            raise ValueError(
                f"model-side steps ({name!r}) are not wired for diffusion pipelines; "
                "use baseline, redundancy, semantics, turbo or tomesd"
            )
        return self.module

    def ratios(self, r: int) -> dict[str, float]:
        """Every component's ratio: ``r / 100`` for the ``merge`` components, the model's
        fixed ratio (or 0) for the others."""
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < 100:
            raise ValueError(
                f"r of a diffusion pipeline is the percentage of tokens merged, an int in "
                f"[0, 100); got {r!r}"
            )
        return {
            f"ratio_{c}": r / 100 if c in self.merge else self.settings.get(f"ratio_{c}", 0.0)
            for c in COMPONENTS
        }

    def set_method(self, overrides: dict[str, Any] | None) -> None:
        """Unpatched for None; else Turbo with ``overrides`` (``r``, ``mode``, ``alpha`` ...)
        plus the model's fixed settings, or the peer named under :data:`PEER`."""
        overrides = dict(overrides) if overrides else {}
        if overrides.pop(SIZE_BIAS, False):
            raise TypeError(
                f"the size-bias methods act on vision-language models, not on the pipeline "
                f"{self.name!r}"
            )
        if overrides.pop(MODEL_SIDE, None) is not None:
            self.side("model-side step")
        self._unpatch()
        if not overrides:
            return
        ratios = self.ratios(overrides.pop("r", 0))
        peer = overrides.pop(PEER, None)
        config = {k: overrides.pop(k) for k in list(overrides) if k in _CONFIG_FIELDS}
        if overrides:  # e.g. a cross-modal method or a ViT-only option: never dropped silently
            raise TypeError(
                f"the pipeline {self.name!r} cannot take the method setting(s) "
                f"{sorted(overrides)}; a pipeline takes r, {', '.join(_CONFIG_FIELDS)} "
                "and the tomesd peer"
            )
        if peer == "tomesd":
            self._apply_tomesd(ratios)
            return
        settings = {**self.settings, **ratios, **config}
        if peer in ("todo", "toma"):  # peers written as methods of the diffusion families
            settings["method"] = peer
        self.handle = turbo_adapters.apply(self.module, **settings)

    def _apply_tomesd(self, ratios: Mapping[str, float]) -> None:
        import tomesd

        ratio = ratios[f"ratio_{self.merge[0]}"]
        tomesd.apply_patch(
            self.module,
            ratio=ratio,
            max_downsample=self.settings.get("max_downsample", 1),
            sx=self.settings.get("sx", 2),
            sy=self.settings.get("sy", 2),
            use_rand=self.settings.get("use_rand", True),
            merge_attn="attn1" in self.merge,
            merge_crossattn="attn2" in self.merge,
            merge_mlp="ff" in self.merge,
        )
        self.peer = "tomesd"

    def _unpatch(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.peer == "tomesd":
            import tomesd

            tomesd.remove_patch(self.module)
        self.peer = None

    # ---------------------------------------------------------- generation
    def generate(self, items: Sequence[GenerationItem]) -> torch.Tensor:
        """Final latents of ``items`` (one batch; every item's settings must agree)."""
        return generate_latents(self.module, items)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] of final latents (the pipeline's VAE)."""
        from .generation import decode_latents

        return decode_latents(self.module, latents)


def generate_latents(pipe: Any, items: Sequence[GenerationItem]) -> torch.Tensor:
    """One pipeline call for ``items``: each with its own seeded generator, latents out."""
    if not items:
        raise ValueError("items must hold at least one GenerationItem")
    first = items[0]
    shared = ("steps", "guidance_scale", "height", "width", "strength")
    for item in items[1:]:
        if any(getattr(item, k) != getattr(first, k) for k in shared):
            raise ValueError(f"items of one call must agree on {shared}")
    call: dict[str, Any] = {
        "prompt": [item.prompt for item in items],
        "generator": [torch.Generator().manual_seed(item.seed) for item in items],
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance_scale,
        "output_type": "latent",
    }
    if first.image is not None:
        call.update(image=torch.stack([item.image for item in items]), strength=first.strength)  # type: ignore[misc]
    else:
        call.update(height=first.height, width=first.width)
    with torch.no_grad():
        return pipe(**call).images.float().cpu()


def pipeline_options() -> frozenset[str]:
    """The model options a pipeline takes: its own, the SD settings, Turbo's per-model ones."""

    return frozenset(_OWN_OPTIONS) | _settings_fields() | frozenset(MODEL_TURBO_OPTIONS)


def _check_options(options: Mapping[str, Any]) -> None:
    allowed = pipeline_options()
    unknown = sorted(set(options) - allowed - {"trust_remote_code"})
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for a diffusion pipeline; allowed: {sorted(allowed)}"
        )
    merge = options.get("merge", ["attn1"])
    if not isinstance(merge, (list, tuple)) or not merge or not set(merge) <= set(COMPONENTS):
        raise ValueError(f"merge must be a non-empty list of {list(COMPONENTS)}, got {merge!r}")
    fixed = [c for c in merge if f"ratio_{c}" in options]
    if fixed:
        raise ValueError(
            f"ratio_{fixed[0]} is set by r (the component is in merge); drop one of the two"
        )
    if options.get("pipeline", "text2img") not in ("text2img", "img2img"):
        raise ValueError(f"pipeline must be 'text2img' or 'img2img', got {options['pipeline']!r}")
    if options.get("dtype", "float32") not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {options['dtype']!r}")


def _from_pretrained(name: str, index: Path, kind: str, dtype: torch.dtype) -> Any:
    import diffusers

    components = json.loads(index.read_text(encoding="utf-8"))
    kwargs: dict[str, Any] = {"local_files_only": True, "torch_dtype": dtype}
    if "safety_checker" in components:  # not needed to measure fidelity; may be absent
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    source = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    pipe = diffusers.DiffusionPipeline.from_pretrained(source, **kwargs)
    if kind == "img2img":
        pipe = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
    return pipe


def load_pipeline_model(
    name: str, resolution: int | None = None, options: Mapping[str, Any] | None = None
) -> PipelineModel:
    """Load a pipeline named by a suite (see :func:`is_pipeline_model`) with its options."""
    from .diffusion import sd15_random_pipeline, tiny_pipeline

    options = dict(options or {})
    _check_options(options)
    kind = str(options.get("pipeline", "text2img"))
    dtype = _DTYPES[str(options.get("dtype", "float32"))]
    seed = int(options.get("seed", 0))
    cast = None if dtype is torch.float32 else dtype  # built in float32
    if name == "sd-tiny":
        pipe = tiny_pipeline(seed, kind)
        pipe = pipe if cast is None else pipe.to(dtype=cast)
    elif name == "sd15-random":
        pipe = sd15_random_pipeline(seed, kind, cast)
    else:
        index = _index_file(name)
        if index is None:
            raise ValueError(f"{name!r} is not a diffusers pipeline folder or cached hub id")
        pipe = _from_pretrained(name, index, kind, dtype)
    pipe = pipe.to(str(options.get("device", "cpu")))
    pipe.set_progress_bar_config(disable=True)
    fields = _settings_fields() - {f"ratio_{c}" for c in COMPONENTS}
    settings = {k: v for k, v in options.items() if k in fields or k.startswith("ratio_")}
    size = resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return PipelineModel(
        name=name,
        module=pipe,
        modality="text-to-image",
        prepare=list,
        forward_features=lambda module, items, handle: generate_latents(module, items),
        options=options,
        merge=tuple(options.get("merge", ("attn1",))),
        settings=settings,
        image_to_image=kind == "img2img",
        size=size,
    )
