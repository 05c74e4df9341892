"""VQA data from local files, the VQA accuracy, and fidelity of a patched generator.

Formats (all read from local paths, nothing downloaded):

- VQAv2 / OK-VQA: a questions JSON (``{"questions": [{"question_id", "image_id",
  "question"}]}``) and an annotations JSON (``{"annotations": [{"question_id",
  "answers": [{"answer"}]}]}``); images ``COCO_<split>_<image_id:012d>.jpg`` in a folder.
- GQA: ``{question_id: {"imageId", "question", "answer"}}``; images ``<imageId>.jpg``.
- VizWiz: ``[{"image", "question", "answers": [{"answer"}]}]``; images by file name.
- easy-vqa (the ``easy-vqa`` package's own test split): real packaged data for tests.

Quality for random-weight models is fidelity to the unpatched model:
:func:`answer_agreement` and :func:`first_token_kl`; with real weights,
:func:`vqa_accuracy` (min(matching human answers / 3, 1), answers normalised as in
the official evaluation: lower case, punctuation, articles and number words).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "VQAItem",
    "answer_agreement",
    "first_token_kl",
    "load_easy_vqa",
    "load_gqa",
    "load_vizwiz",
    "load_vqa_v2",
    "normalize_answer",
    "vqa_accuracy",
]


@dataclasses.dataclass(frozen=True)
class VQAItem:
    """One question: image file, question, the human answers (possibly one)."""

    image: Path
    question: str
    answers: tuple[str, ...]
    question_id: str = ""


def _json(path: str | Path) -> object:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_vqa_v2(
    questions: str | Path, annotations: str | Path, images: str | Path, split: str = "val2014",
    limit: int | None = None,
) -> list[VQAItem]:  # fmt: skip
    """VQAv2 or OK-VQA (same layout) from local files."""
    answers = {
        a["question_id"]: tuple(x["answer"] for x in a["answers"])
        for a in _json(annotations)["annotations"]  # type: ignore[index]
    }
    items = []
    for q in _json(questions)["questions"]:  # type: ignore[index]
        image = Path(images) / f"COCO_{split}_{int(q['image_id']):012d}.jpg"
        items.append(
            VQAItem(image, q["question"], answers.get(q["question_id"], ()), str(q["question_id"]))
        )
    return items[:limit]


def load_gqa(questions: str | Path, images: str | Path, limit: int | None = None) -> list[VQAItem]:
    """GQA balanced questions (one answer each) from local files."""
    data = _json(questions)
    items = [
        VQAItem(Path(images) / f"{q['imageId']}.jpg", q["question"], (q["answer"],), str(key))
        for key, q in data.items()  # type: ignore[union-attr]
    ]
    return items[:limit]


def load_vizwiz(
    annotations: str | Path, images: str | Path, limit: int | None = None
) -> list[VQAItem]:
    """VizWiz VQA from local files."""
    items = [
        VQAItem(
            Path(images) / q["image"],
            q["question"],
            tuple(a["answer"] for a in q.get("answers", ())),
            q["image"],
        )
        for q in _json(annotations)  # type: ignore[union-attr]
    ]
    return items[:limit]


def load_easy_vqa(limit: int | None = None) -> list[VQAItem]:
    """The ``easy-vqa`` package's test split (shapes and colours, 64 x 64 PNGs)."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    items = [
        VQAItem(Path(paths[i]), q, (a,), str(n))
        for n, (q, a, i) in enumerate(zip(questions, answers, image_ids, strict=True))
    ]
    return items[:limit]


# ---------------------------------------------------------------- metrics
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """Lower case, punctuation to spaces (decimal points kept), number words, no articles."""
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    text = re.sub(r"(?<!\d)\.(?!\d)", " ", text)
    text = re.sub(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:|']", " ", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#human answers equal to the prediction / 3, 1), averaged over the 10
    leave-one-out subsets when there are 10 answers (the official protocol)."""
    if not answers:
        raise ValueError("answers must not be empty")
    pred = normalize_answer(prediction)
    norm = [normalize_answer(a) for a in answers]
    if len(norm) < 10:
        return (
            min(sum(a == pred for a in norm) / 3.0, 1.0)
            if len(norm) > 1
            else float(norm[0] == pred)
        )
    scores = []
    for skip in range(len(norm)):
        others = norm[:skip] + norm[skip + 1 :]
        scores.append(min(sum(a == pred for a in others) / 3.0, 1.0))
    return sum(scores) / len(scores)


def answer_agreement(patched: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of rows whose generated token ids equal the reference's, ``(B, T)`` each."""
    if patched.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(patched.shape)} vs {tuple(reference.shape)}")
    return (patched == reference).all(-1).float().mean().item()


def first_token_kl(patched_logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Mean KL(reference || patched) of the first generated token's distribution, ``(B, V)``."""
    ref = reference_logits.float().log_softmax(-1)
    out = patched_logits.float().log_softmax(-1)
    return (ref.exp() * (ref - out)).sum(-1).mean().item()
