"""Image captioning: fidelity to the unpatched model's captions, and BLEU-4 / CIDEr / METEOR."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .base import Progress, Task, register_task
from .vl_common import (
    HEADLINES,
    check_choice,
    check_positive,
    kl_rows,
    map_indices,
    require_vl_model,
    uses_reference,
)


@register_task
class CaptionTask(Task):
    """Greedy captions of a captioning model (BLIP, BLIP-2, LLaVA and MiniGPT-v2 with a
    caption prompt), compared with the unpatched model's.

    Per image, against the unpatched model's greedy caption: ``token_agreement`` (the
    patched model, teacher-forced on that caption, predicts the same token at each of
    its positions; the share that agree), ``caption_kl`` (mean KL of the unpatched
    next-token distribution to the patched one over those positions) and
    ``caption_match`` (the patched model's own greedy caption is the same). With
    reference captions, ``bleu4``, ``cider`` (and ``meteor`` when ``meteor = true`` and
    Java is installed) through pycocoevalcap, per-image CIDEr as items.

    Data: the packaged photos with their captions
    (:data:`~turbo_eval.vl_data.PHOTO_CAPTIONS`), an image ``folder`` (no references),
    or a COCO / Flickr30k Karpathy-split JSON (``annotations``) with its ``image_root``.

    ``headline``: ``"auto"`` (CIDEr for pretrained weights with references, else token
    agreement), ``"fidelity"`` or ``"reference"``.
    """

    kind = "caption"
    metric = "token_agreement"
    item_score = "token_agreement"
    modality = "vision-language"
    options: ClassVar[dict[str, tuple[type, Any]]] = {
        "images": (int, 8),
        "annotations": (str, ""),
        "image_root": (str, ""),
        "split": (str, "test"),
        "folder": (str, ""),
        "prompt": (str, ""),
        "max_new_tokens": (int, 20),
        "meteor": (bool, False),
        "headline": (str, "auto"),
    }

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> list[tuple[str | None, str]]:
        problems = super().validate(options)
        problems += check_choice(options, "headline", HEADLINES)
        problems += check_positive(options, "images", "max_new_tokens")
        if options.get("annotations") and not options.get("image_root"):
            problems.append(("image_root", "the image folder of the annotations is required"))
        if options.get("annotations") and options.get("folder"):
            problems.append(("folder", "give either annotations or folder, not both"))
        return problems

    # ------------------------------------------------------------ data
    def _data(self) -> tuple[list[Any], list[tuple[str, ...]], str]:
        from ..vl_data import load_caption_annotations, packaged_captioned_photos

        limit = int(self.config["images"])
        if self.config["annotations"]:
            found = load_caption_annotations(
                self.config["annotations"], self.config["image_root"], self.config["split"], limit
            )
            return [c.image for c in found], [c.captions for c in found], "annotations"
        if self.config["folder"]:
            from ..assets.images import load_image_files

            photos = load_image_files(self.config["folder"], limit)
            if not photos:
                raise FileNotFoundError(f"no images under {self.config['folder']}")
            return [p.image for p in photos], [() for _ in photos], "folder"
        found = packaged_captioned_photos(limit)
        return [c.image for c in found], [c.captions for c in found], "packaged photos"

    def prepare(self, progress: Progress) -> dict[str, Any]:
        from ..vl import VLSample

        model = require_vl_model(self.model, self.kind, "generate", "caption")
        images, captions, source = self._data()
        prompt = self.config["prompt"] or model.caption_prompt
        self.samples = [
            VLSample(image, prompt, refs, str(n))
            for n, (image, refs) in enumerate(zip(images, captions, strict=True))
        ]
        self.has_references = all(captions)
        self.reference_metric = uses_reference(
            self.config["headline"], model, self.has_references, "annotations"
        )
        if self.reference_metric:
            self.metric = self.item_score = "cider"
        model.speed_purpose, model.speed_tokens = "caption", int(self.config["max_new_tokens"])
        model.set_flops_probe(self.samples[:2])  # what cross-modal splits are matched on
        model.set_method(None)  # the runner sets each cell's method before evaluate
        steps = int(self.config["max_new_tokens"])

        def reference(indices: list[int]) -> torch.Tensor:
            batch = [self.samples[i] for i in indices]
            tokens = model.generate(batch, "caption", steps).tokens
            logits = model.teacher_forced(batch, "caption", tokens)
            return torch.cat([tokens.float(), logits.flatten(1)], 1)

        packed = map_indices(len(self.samples), self.batch_size, reference, progress, "captions")
        self.ref_tokens = packed[:, :steps].long()
        self.ref_logits = packed[:, steps:].view(len(self.samples), steps, -1)
        self.ref_ends = model.end_index(self.ref_tokens)
        self.ref_text = model.decode(self.ref_tokens)
        return {
            "dataset": source,
            "images": len(self.samples),
            "references": self.has_references,
            "weights": model.weights,
            "prompt": prompt,
            "headline": self.metric,
            "distinct_reference_captions": len(set(self.ref_text)),
        }

    # -------------------------------------------------------- evaluate
    def evaluate(self, progress: Progress) -> dict[str, Any]:
        model = self.model
        steps = self.ref_tokens.shape[1]
        positions = torch.arange(steps)

        def cell(indices: list[int]) -> torch.Tensor:
            batch = [self.samples[i] for i in indices]
            reference = self.ref_tokens[indices]
            logits = model.teacher_forced(batch, "caption", reference)  # type: ignore[attr-defined]
            tokens = model.generate(batch, "caption", steps).tokens  # type: ignore[attr-defined]
            real = (positions < self.ref_ends[indices, None]).float()
            agree = ((logits.argmax(-1) == reference).float() * real).sum(1) / real.sum(1)
            kl = (kl_rows(self.ref_logits[indices], logits) * real).sum(1) / real.sum(1)
            ends = model.end_index(tokens)  # type: ignore[attr-defined]
            same = (ends == self.ref_ends[indices]) & (
                (tokens == reference) | (positions >= ends[:, None])
            ).all(1)
            return torch.cat([torch.stack([agree, kl, same.float()], 1), tokens.float()], 1)

        packed = map_indices(len(self.samples), self.batch_size, cell, progress, "captions")
        agree, kl, same = packed[:, 0], packed[:, 1], packed[:, 2]
        captions = model.decode(packed[:, 3:].long())  # type: ignore[attr-defined]
        metrics: dict[str, Any] = {
            "token_agreement": float(agree.mean()),
            "caption_kl": float(kl.mean()),
            "caption_match": float(same.mean()),
        }
        items: dict[str, list[Any]] = {
            "token_agreement": agree.tolist(),
            "caption_kl": kl.tolist(),
            "caption_match": same.tolist(),
        }
        if self.has_references:
            from ..vl_metrics import caption_scores, cider_per_image

            predictions = {s.key: c for s, c in zip(self.samples, captions, strict=True)}
            references = {s.key: list(s.answers) for s in self.samples}
            meteor = None if self.config["meteor"] else False
            metrics.update(caption_scores(predictions, references, meteor=meteor))
            per_image = cider_per_image(predictions, references)
            items["cider"] = [per_image[s.key] for s in self.samples]
            metrics["cider"] = sum(items["cider"]) / len(items["cider"])
        return {**metrics, "items": items}

    def speed_items(self) -> Sequence[Any]:
        return self.samples
