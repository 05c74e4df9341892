"""Visual question answering: agreement with the unpatched model's answers, VQAv2 accuracy."""

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
class VQATask(Task):
    """Greedy answers of a VQA model (BLIP VQA, BLIP-2, LLaVA, MiniGPT-v2).

    Per question, against the unpatched model: ``answer_match`` (the same answer tokens)
    and ``first_token_kl`` (KL of the unpatched first-token distribution to the patched
    one). With human answers, ``accuracy``: the VQAv2 soft score (min(matching answers /
    3, 1) over the leave-one-out subsets, answers normalised as the official evaluation
    does).

    ``dataset``: ``"easy-vqa"`` (the packaged easy-VQA test split), ``"vqav2"`` and
    ``"okvqa"`` (``questions``, ``annotations``, ``images``; ``image_split`` names the
    COCO files), ``"gqa"`` (``questions``, ``images``) or ``"vizwiz"``
    (``annotations``, ``images``). ``headline``: ``"auto"`` (accuracy for pretrained
    weights, else answer agreement), ``"fidelity"`` or ``"reference"``.
    """

    kind = "vqa"
    metric = "answer_match"
    item_score = "answer_match"
    modality = "vision-language"
    options: ClassVar[dict[str, tuple[type, Any]]] = {
        "dataset": (str, "easy-vqa"),
        "questions": (str, ""),
        "annotations": (str, ""),
        "images": (str, ""),
        "image_split": (str, "val2014"),
        "limit": (int, 16),
        "max_new_tokens": (int, 8),
        "headline": (str, "auto"),
    }

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> list[tuple[str | None, str]]:
        from ..vl_data import VQA_DATASETS

        problems = super().validate(options)
        problems += check_choice(options, "headline", HEADLINES)
        problems += check_choice(options, "dataset", sorted(VQA_DATASETS))
        problems += check_positive(options, "limit", "max_new_tokens")
        dataset = options.get("dataset", "easy-vqa")
        for key in VQA_DATASETS.get(dataset, ()) if isinstance(dataset, str) else ():
            if not options.get(key):
                problems.append((key, f"dataset {dataset!r} needs this path"))
        return problems

    def prepare(self, progress: Progress) -> dict[str, Any]:
        from ..vl_data import load_vqa_samples

        model = require_vl_model(self.model, self.kind, "generate", "vqa")
        paths = {k: self.config[k] for k in ("questions", "annotations", "images")}
        self.samples = load_vqa_samples(
            self.config["dataset"], paths, int(self.config["limit"]), self.config["image_split"]
        )
        if not self.samples:
            raise FileNotFoundError(f"no questions in {self.config['dataset']}")
        self.has_answers = all(s.answers for s in self.samples)
        if uses_reference(self.config["headline"], model, self.has_answers, "annotations"):
            self.metric = self.item_score = "accuracy"
        model.speed_purpose, model.speed_tokens = "vqa", int(self.config["max_new_tokens"])
        model.set_flops_probe(self.samples[:2])  # what cross-modal splits are matched on
        model.set_method(None)  # the runner sets each cell's method before evaluate
        packed = map_indices(len(self.samples), self.batch_size, self._answers, progress, "VQA")
        steps = int(self.config["max_new_tokens"])
        self.ref_tokens = packed[:, :steps].long()
        self.ref_first = packed[:, steps:]
        self.ref_ends = model.end_index(self.ref_tokens)
        return {
            "dataset": self.config["dataset"],
            "questions": len(self.samples),
            "answers": self.has_answers,
            "weights": model.weights,
            "headline": self.metric,
            "distinct_reference_answers": len(set(model.decode(self.ref_tokens))),
        }

    def _answers(self, indices: list[int]) -> torch.Tensor:
        batch = [self.samples[i] for i in indices]
        out = self.model.generate(batch, "vqa", int(self.config["max_new_tokens"]))  # type: ignore[attr-defined]
        return torch.cat([out.tokens.float(), out.first_logits], 1)

    def evaluate(self, progress: Progress) -> dict[str, Any]:
        from ..vl_metrics import vqa_accuracy

        model = self.model
        steps = self.ref_tokens.shape[1]
        packed = map_indices(len(self.samples), self.batch_size, self._answers, progress, "VQA")
        tokens, first = packed[:, :steps].long(), packed[:, steps:]
        ends = model.end_index(tokens)  # type: ignore[attr-defined]
        positions = torch.arange(steps)
        match = (ends == self.ref_ends) & (
            (tokens == self.ref_tokens) | (positions >= ends[:, None])
        ).all(1)
        kl = kl_rows(self.ref_first, first)
        items: dict[str, list[Any]] = {
            "answer_match": match.float().tolist(),
            "first_token_kl": kl.tolist(),
        }
        metrics: dict[str, Any] = {
            "answer_match": float(match.float().mean()),
            "first_token_kl": float(kl.mean()),
        }
        if self.has_answers:
            answers = model.decode(tokens)  # type: ignore[attr-defined]
            items["accuracy"] = [
                vqa_accuracy([a], [list(s.answers)])
                for a, s in zip(answers, self.samples, strict=True)
            ]
            metrics["accuracy"] = sum(items["accuracy"]) / len(items["accuracy"])
        return {**metrics, "items": items}

    def speed_items(self) -> Sequence[Any]:
        return self.samples
