"""Putting a loaded or random module together with its head, tokenizer and image
processor into a :class:`~turbo_eval.vl.model.VLModel`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..vl_data import VLSample
from .catalog import TEMPLATES, VL_ARCHITECTURES
from .heads import Head
from .model import SpeedInputs, VLModel

__all__ = ["Pixels", "assemble", "image_processor", "vision_size", "vl_model"]


def as_image(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array[:, :, :3]))


class Pixels:
    """Images (arrays, files, PIL) -> the model's pixel tensor, through a transformers
    image processor."""

    def __init__(self, processor: Any, size: int) -> None:
        self.processor = processor
        self.size = size

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        if not len(images):
            raise ValueError("images must not be empty")
        batch = self.processor([as_image(i) for i in images], return_tensors="pt")
        return batch["pixel_values"]


def image_processor(family: str, size: int) -> Any:
    import transformers

    if family == "llava":
        return transformers.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    return transformers.BlipImageProcessor(size={"height": size, "width": size})


def vision_size(config: Any) -> int:
    vision = getattr(config, "vision_config", None)
    return int(vision.image_size if vision is not None else config.image_size)


def assemble(
    name: str,
    module: nn.Module,
    architecture: str,
    tokenizer: Any,
    processor: Any,
    weights: str,
    qformer_tokenizer: Any = None,
) -> VLModel:
    family, head_class = VL_ARCHITECTURES[architecture]
    config = module.config
    size = vision_size(config)
    extra = {} if qformer_tokenizer is None else {"qformer_tokenizer": qformer_tokenizer}
    head = head_class(config, tokenizer, Pixels(processor, size), TEMPLATES[family], **extra)
    return vl_model(name, module, family, head, tokenizer, weights)


def vl_model(
    name: str, module: nn.Module, family: str, head: Head, tokenizer: Any, weights: str
) -> VLModel:
    def prepare(items: Sequence[Any]) -> SpeedInputs:
        samples = [i if isinstance(i, VLSample) else VLSample(i, "") for i in items]
        purpose = model.speed_purpose if model.speed_purpose in head.purposes else head.purposes[0]
        texts = [s.text or (model.caption_prompt if purpose == "caption" else "") for s in samples]
        inputs = head.inputs([s.image for s in samples], texts, purpose)
        return SpeedInputs(inputs, model.speed_tokens)

    def forward(module: nn.Module, prepared: SpeedInputs, handle: Any) -> Any:
        return head.speed(module, prepared.inputs, prepared.max_new_tokens)

    model = VLModel(
        name, module.eval(), "vision-language", prepare, forward,
        head=head, family=family, weights=weights, tokenizer=tokenizer,
    )  # fmt: skip
    return model
