"""Generation fidelity: every method's images against the unpatched pipeline's, seed for seed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .base import Progress, Task, register_task

#: Prompts used when a suite gives none: short captions of everyday scenes.
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a sofa",
    "a red bicycle leaning against a brick wall",
    "a bowl of fruit on a wooden table",
    "a lighthouse on a rocky coast at sunset",
    "a snowy mountain above a pine forest",
    "a city street with yellow taxis in the rain",
    "an astronaut riding a horse on the moon",
    "a plate of pasta with basil and tomatoes",
)


@register_task
class GenerationFidelityTask(Task):
    """PSNR and SSIM of decoded images and MSE of final latents against the unpatched
    pipeline's, per (prompt, seed): the paired intervals between methods use them.

    Needs a diffusion pipeline model (``sd-tiny``, ``sd15-random``, a local diffusers
    folder). An image-to-image pipeline (model option ``pipeline = "img2img"``) starts
    from real photos that ship offline, or from the images under ``init_images``.
    ``clip_model`` (a local CLIP folder) adds the CLIP score of every method's images.
    """

    kind = "generation-fidelity"
    metric = "ssim"
    item_score = "ssim"
    modality = "text"
    options: ClassVar[dict[str, tuple[type, Any]]] = {
        "prompts": (list, []),
        "prompts_file": (str, ""),
        "max_prompts": (int, 0),
        "seeds": (int, 1),
        "steps": (int, 20),
        "guidance_scale": (float, 7.5),
        "height": (int, 0),
        "width": (int, 0),
        "strength": (float, 0.6),
        "init_images": (str, ""),
        "clip_model": (str, ""),
    }

    @classmethod
    def validate(cls, options: Any) -> list[tuple[str | None, str]]:
        problems = super().validate(options)
        prompts = options.get("prompts", [])
        if isinstance(prompts, list) and not all(isinstance(p, str) and p for p in prompts):
            problems.append(("prompts", "must be a list of non-empty strings"))
        for key in ("seeds", "steps"):
            value = options.get(key, 1)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                problems.append((key, f"must be >= 1, got {value}"))
        strength = options.get("strength", 0.6)
        if isinstance(strength, (int, float)) and not 0 < strength <= 1:
            problems.append(("strength", f"must be in (0, 1], got {strength}"))
        return problems

    # ---------------------------------------------------------------- data
    def _prompts(self) -> list[str]:
        prompts = list(self.config["prompts"])
        if self.config["prompts_file"]:
            path = self.config["prompts_file"]
            with open(path, encoding="utf-8") as handle:
                prompts += [line.strip() for line in handle if line.strip()]
        if not prompts:
            prompts = list(DEFAULT_PROMPTS)
        limit = int(self.config["max_prompts"])
        return prompts[:limit] if limit else prompts

    def _init_images(self, count: int, height: int, width: int) -> list[torch.Tensor]:
        from PIL import Image

        from ..assets.images import load_image_files, real_photos

        folder = self.config["init_images"]
        photos = load_image_files(folder, count) if folder else real_photos(max_images=count)
        if not photos:
            raise FileNotFoundError("no init images: install scikit-image or give init_images")
        out = []
        for photo in photos:
            image = photo.image
            pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
            pil = pil.convert("RGB").resize((width, height), Image.BICUBIC)
            array = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8)
            out.append(array.view(height, width, 3).permute(2, 0, 1).float() / 255.0)
        return out

    def prepare(self, progress: Progress) -> dict[str, Any]:
        from ..pipelines import GenerationItem, PipelineModel

        if not isinstance(self.model, PipelineModel):
            raise TypeError(
                f"{self.kind!r} needs a diffusion pipeline model (sd-tiny, sd15-random, a "
                f"diffusers folder), not {self.model.name!r}"
            )
        height = int(self.config["height"]) or self.model.size
        width = int(self.config["width"]) or self.model.size
        prompts = self._prompts()
        images: list[torch.Tensor | None] = [None] * len(prompts)
        if self.model.image_to_image:
            photos = self._init_images(len(prompts), height, width)
            images = [photos[i % len(photos)] for i in range(len(prompts))]
        elif self.config["init_images"]:
            raise ValueError(
                'init_images needs an image-to-image pipeline: set pipeline = "img2img" '
                f"on model {self.model.name!r}"
            )
        self.items = [
            GenerationItem(
                prompt=prompt,
                seed=self.seed + index * int(self.config["seeds"]) + s,
                steps=int(self.config["steps"]),
                guidance_scale=float(self.config["guidance_scale"]),
                height=height,
                width=width,
                image=image,
                strength=float(self.config["strength"]),
            )
            for index, (prompt, image) in enumerate(zip(prompts, images, strict=True))
            for s in range(int(self.config["seeds"]))
        ]
        self.model.set_method(None)  # the runner sets each cell's method before evaluate
        self.reference = self._generate(progress, "unpatched images")
        return {
            "kind": "image-to-image" if self.model.image_to_image else "text-to-image",
            "prompts": len(prompts),
            "seeds": int(self.config["seeds"]),
            "images": len(self.items),
            "steps": int(self.config["steps"]),
            "size": [height, width],
        }

    def _generate(self, progress: Progress, label: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Final latents and decoded images of every item under the current method."""
        from ..distributed import map_batches

        model = self.model
        latents = map_batches(self.items, self.batch_size, model.generate, progress, label)  # type: ignore[attr-defined]
        images = torch.cat(
            [
                model.decode(latents[i : i + self.batch_size])  # type: ignore[attr-defined]
                for i in range(0, len(latents), self.batch_size)
            ]
        )
        return latents, images

    # ------------------------------------------------------------ metrics
    def evaluate(self, progress: Progress) -> dict[str, Any]:
        from ..generation import clip_score, psnr_per_image, ssim_per_image

        if self.model.unpatched:  # type: ignore[attr-defined]
            latents, images = self.reference  # same seeds, same pipeline: the same images
        else:
            latents, images = self._generate(progress, "images")
        ref_latents, ref_images = self.reference
        psnr = psnr_per_image(images, ref_images)
        ssim = ssim_per_image(images, ref_images)
        mse = (latents.double() - ref_latents.double()).pow(2).flatten(1).mean(1).tolist()
        metrics: dict[str, Any] = {
            "ssim": sum(ssim) / len(ssim),
            "psnr": sum(psnr) / len(psnr),  # inf when every image is identical
            "psnr_finite": _finite_mean(psnr),
            "latent_mse": sum(mse) / len(mse),
        }
        if self.config["clip_model"]:
            prompts = [item.prompt for item in self.items]
            metrics["clip_score"] = clip_score(images, prompts, self.config["clip_model"])
        return {**metrics, "items": {"ssim": ssim, "psnr": psnr, "latent_mse": mse}}

    def speed_items(self) -> Sequence[Any]:
        return self.items


def _finite_mean(values: list[float]) -> float | None:
    """Mean PSNR over the images that differ from the reference (None if none does)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None
