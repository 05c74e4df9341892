"""Image-text retrieval: ITM score fidelity per query, and recall@1/5/10 with ITM re-ranking."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .base import Progress, Task, register_task
from .vl_common import HEADLINES, check_choice, check_positive, require_vl_model, uses_reference


def _ranks(rows: torch.Tensor) -> torch.Tensor:
    """Average ranks of each row (ties share their mean rank), as scipy's ``rankdata``."""
    from scipy.stats import rankdata

    return torch.as_tensor(rankdata(rows.double().numpy(), axis=-1))


def spearman_rows(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row of ``scores`` with the same row of ``reference``.

    A row whose ranks are constant (every candidate tied) has no correlation: it counts
    1 when the other row is constant too (the same ranking) and 0 otherwise.
    """
    a, b = _ranks(scores), _ranks(reference)
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    norm = a.norm(dim=-1) * b.norm(dim=-1)
    both_flat = (a.norm(dim=-1) == 0) & (b.norm(dim=-1) == 0)
    rho = torch.where(norm > 0, (a * b).sum(-1) / norm.clamp(min=1e-300), both_flat.double())
    return rho.float()


@register_task
class VLRetrievalTask(Task):
    """Image-text retrieval with an ITM model (BLIP ITM, BLIP-2 ITM).

    Fidelity (every text against every image): per text query, ``itm_spearman`` (rank
    correlation of its ITM scores over the images with the unpatched model's),
    ``itm_top1_agreement`` (the same best image) and ``itc_spearman`` (the same for the
    ITC similarity, which reads the CLS / Q-Former queries). Recall (both directions,
    R@1/5/10): ITC ranks every candidate, ITM re-ranks each query's top ``k`` (as BLIP
    evaluates); with the full ITM matrix computed, the re-ranking reads from it.

    Data: the packaged photos with their captions (``captions_per_image`` texts each),
    or a COCO / Flickr30k Karpathy-split JSON (``annotations``, ``image_root``,
    ``split``). ``headline``: ``"auto"`` (text-to-image R@1 for pretrained weights,
    else ``itm_spearman``), ``"fidelity"`` or ``"reference"``. The fidelity metrics
    need every pair's ITM score (texts x images calls); with ``headline = "reference"``
    only each query's top ``k`` are scored.
    """

    kind = "vl-retrieval"
    metric = "itm_spearman"
    item_score = "itm_spearman"
    modality = "vision-language"
    options: ClassVar[dict[str, tuple[type, Any]]] = {
        "images": (int, 8),
        "captions_per_image": (int, 1),
        "annotations": (str, ""),
        "image_root": (str, ""),
        "split": (str, "test"),
        "k": (int, 16),
        "headline": (str, "auto"),
    }

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> list[tuple[str | None, str]]:
        problems = super().validate(options)
        problems += check_choice(options, "headline", HEADLINES)
        problems += check_positive(options, "images", "captions_per_image", "k")
        if isinstance(options.get("images"), int) and 0 < options["images"] < 3:
            problems.append(
                ("images", f"must be >= 3 (ranks over images), got {options['images']}")
            )
        if options.get("annotations") and not options.get("image_root"):
            problems.append(("image_root", "the image folder of the annotations is required"))
        return problems

    def prepare(self, progress: Progress) -> dict[str, Any]:
        from ..vl_data import load_caption_annotations, packaged_captioned_photos

        model = require_vl_model(self.model, self.kind, "match", None)
        limit = int(self.config["images"])
        if self.config["annotations"]:
            found = load_caption_annotations(
                self.config["annotations"], self.config["image_root"], self.config["split"], limit
            )
            source = "annotations"
        else:
            found = packaged_captioned_photos(limit)
            source = "packaged photos"
        if len(found) < 3:
            raise FileNotFoundError(f"retrieval needs >= 3 captioned images, found {len(found)}")
        per_image = int(self.config["captions_per_image"])
        self.images = [c.image for c in found]
        self.texts: list[str] = []
        owners: list[int] = []
        for index, captioned in enumerate(found):
            for caption in captioned.captions[:per_image]:
                self.texts.append(caption)
                owners.append(index)
        self.text_image = torch.tensor(owners)
        self.reference_metric = uses_reference(self.config["headline"], model, True, "annotations")
        if self.reference_metric:
            self.metric = self.item_score = "t2i_r1"
        model.speed_purpose = "caption"
        model.set_flops_probe(list(self.speed_items())[:2])  # cross-modal splits match on it
        model.set_method(None)  # the runner sets each cell's method before evaluate
        self.reference = None if self.reference_metric else self._scores()
        return {
            "dataset": source,
            "images": len(self.images),
            "texts": len(self.texts),
            "weights": model.weights,
            "headline": self.metric,
        }

    def _scores(self) -> dict[str, torch.Tensor]:
        session = self.model.retrieval(self.images, self.texts, self.batch_size)  # type: ignore[attr-defined]
        return {"itc": session.itc(), "itm": session.itm_matrix()}

    def evaluate(self, progress: Progress) -> dict[str, Any]:
        from ..vl_metrics import itm_rerank_ranks

        k = int(self.config["k"])
        metrics: dict[str, Any] = {}
        items: dict[str, list[Any]] = {}
        if self.reference_metric:  # ITC for all, ITM for each query's top k only
            session = self.model.retrieval(self.images, self.texts, self.batch_size)  # type: ignore[attr-defined]
            ranks = itm_rerank_ranks(session.itc(), self.text_image, session.itm, k)
        else:
            scores = self._scores()
            itm = scores["itm"]  # (T, I)
            ranks = itm_rerank_ranks(scores["itc"], self.text_image, lambda i, t: itm[t, i], k)
            spearman = spearman_rows(itm, self.reference["itm"])  # type: ignore[index]
            itc_spearman = spearman_rows(scores["itc"].T, self.reference["itc"].T)  # type: ignore[index]
            top1 = (itm.argmax(1) == self.reference["itm"].argmax(1)).float()  # type: ignore[index]
            items.update(
                itm_spearman=spearman.tolist(),
                itm_top1_agreement=top1.tolist(),
                itc_spearman=itc_spearman.tolist(),
            )
            metrics.update(
                itm_spearman=float(spearman.mean()),
                itm_top1_agreement=float(top1.mean()),
                itc_spearman=float(itc_spearman.mean()),
            )
        for name in ("i2t", "t2i"):
            for cut in (1, 5, 10):
                metrics[f"{name}_r{cut}"] = float((ranks[name] < cut).float().mean())
        metrics["r_mean"] = (
            sum(metrics[f"{n}_r{c}"] for n in ("i2t", "t2i") for c in (1, 5, 10)) / 6
        )
        items["t2i_r1"] = (ranks["t2i"] < 1).float().tolist()
        items["t2i_rank"] = ranks["t2i"].tolist()
        return {**metrics, "items": items}

    def speed_items(self) -> Sequence[Any]:
        from ..vl import VLSample

        return [
            VLSample(self.images[int(i)], text)
            for text, i in zip(self.texts, self.text_image, strict=True)
        ]
