"""Vision-language metrics: VQAv2 accuracy, captioning scores, retrieval with ITM re-ranking.

- :func:`vqa_accuracy`: the VQAv2 soft score (an answer is fully right when at least 3
  of the annotators gave it), averaged over the leave-one-annotator-out subsets as the
  official evaluation does, after the standard answer normalisation
  (:func:`normalize_answer`).
- :func:`caption_scores`: BLEU-4 and CIDEr through ``pycocoevalcap`` (and METEOR where
  its Java runtime is available), on lower-cased, punctuation-free captions.
- :func:`itm_rerank_recall`: image-text retrieval as BLIP evaluates it: rank by the ITC
  similarity, re-rank the top ``k`` candidates by the ITM score, then recall@1/5/10 in
  both directions with several captions per image.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = [
    "caption_scores",
    "cider_per_image",
    "itm_rerank_ranks",
    "itm_rerank_recall",
    "normalize_answer",
    "vqa_accuracy",
]

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't",
    "cant": "can't", "wont": "won't", "didnt": "didn't", "wasnt": "wasn't",
    "werent": "weren't", "hasnt": "hasn't", "havent": "haven't", "shouldnt": "shouldn't",
    "couldnt": "couldn't", "wouldnt": "wouldn't", "im": "i'm", "ive": "i've",
    "youre": "you're", "theyre": "they're", "thats": "that's", "whats": "what's",
    "lets": "let's", "its": "it's",
}  # fmt: skip
# punctuation is removed, except an apostrophe inside a word and a comma or point
# inside a number ("1,000", "2.5" stay numbers)
_PUNCT = re.compile(r"(?!(?<=\d)[.,](?=\d))[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:.]")


def normalize_answer(answer: str) -> str:
    """The standard VQA answer normalisation (lower case, punctuation, numbers, articles)."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    text = _PUNCT.sub(lambda m: "" if m.group(0) in "'" else " ", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQAv2 accuracy of ``predictions`` against each question's human answers.

    For one question with n human answers of which m equal the prediction, the score
    is the mean over the n leave-one-out subsets of ``min(1, matches / 3)``; with 10
    answers: 3 matches score 1, 2 score 0.6, 1 scores 0.3.
    """
    if len(predictions) != len(answers):
        raise ValueError(
            f"predictions ({len(predictions)}) and answers ({len(answers)}) must have one "
            "entry per question"
        )
    if not predictions:
        raise ValueError("predictions must not be empty")
    total = 0.0
    for predicted, humans in zip(predictions, answers, strict=True):
        if not humans:
            raise ValueError("every question needs at least one human answer")
        guess = normalize_answer(predicted)
        hits = [normalize_answer(a) == guess for a in humans]
        n, m = len(hits), sum(hits)
        if n == 1:
            total += float(m)
            continue
        # leaving out a matching answer leaves m - 1 matches, another one leaves m
        total += (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n
    return total / len(predictions)


def _tokens(caption: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", caption.lower()).split())


def caption_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    meteor: bool | None = None,
) -> dict[str, float]:
    """BLEU-4, CIDEr (and METEOR) of one predicted caption per image id.

    Args:
        predictions: image id -> generated caption.
        references: image id -> human captions (every predicted id must have some).
        meteor: compute METEOR (needs ``java``); None computes it when Java is found.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    missing = sorted(set(predictions) - set(references))
    if missing:
        raise ValueError(f"no reference captions for image ids {missing[:5]}")
    if not predictions:
        raise ValueError("predictions must not be empty")
    if any(not references[key] for key in predictions):
        raise ValueError("every image needs at least one reference caption")
    res = {key: [_tokens(caption)] for key, caption in predictions.items()}
    gts = {key: [_tokens(c) for c in references[key]] for key in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {"bleu4": float(bleu[3]), "cider": float(Cider().compute_score(gts, res)[0])}
    if meteor is None:
        meteor = shutil.which("java") is not None
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["meteor"] = float(Meteor().compute_score(gts, res)[0])
    return scores


def cider_per_image(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """CIDEr of each image's caption (their mean is the corpus CIDEr of the same set)."""
    from pycocoevalcap.cider.cider import Cider

    keys = list(predictions)
    if not keys or any(not references.get(key) for key in keys):
        raise ValueError("every predicted image needs at least one reference caption")
    res = {key: [_tokens(predictions[key])] for key in keys}
    gts = {key: [_tokens(c) for c in references[key]] for key in keys}
    _, scores = Cider().compute_score(gts, res)
    return {key: float(score) for key, score in zip(keys, scores, strict=True)}


def itm_rerank_recall(
    itc: torch.Tensor,
    text_image: torch.Tensor,
    itm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    k: int = 16,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways: ITC ranks everything, ITM re-ranks each query's top ``k``.

    Args:
        itc: ``(I, T)`` ITC similarity of every image to every text.
        text_image: ``(T,)`` the index of the image each text describes.
        itm: ``itm(image_idx, text_idx)`` -> ITM match scores of those pairs (1-D,
            same length); called once per query with its ``k`` candidates.
        k: candidates re-ranked per query (the rest keep their ITC order below them).
        ks: the recall cut-offs.

    Keys: ``i2t_r{k}`` (an image finds any of its texts) and ``t2i_r{k}``.
    """
    if k < 1 or not ks or any(c < 1 for c in ks):
        raise ValueError(f"k and every cut-off must be >= 1, got k={k}, ks={tuple(ks)}")
    ranks = itm_rerank_ranks(itc, text_image, itm, k)
    result = {}
    for name, rank in (("i2t", ranks["i2t"]), ("t2i", ranks["t2i"])):
        for cut in ks:
            result[f"{name}_r{cut}"] = float((rank < cut).float().mean())
    return result


def itm_rerank_ranks(
    itc: torch.Tensor,
    text_image: torch.Tensor,
    itm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    k: int = 16,
) -> dict[str, torch.Tensor]:
    """0-based rank of the truth per query after ITM re-ranking (see :func:`itm_rerank_recall`).

    Keys: ``i2t`` (per image: its best-ranked own text) and ``t2i`` (per text: its image).
    """
    if itc.dim() != 2 or text_image.shape != (itc.shape[1],):
        raise ValueError(
            f"itc must be (I, T) and text_image (T,), got {tuple(itc.shape)} and "
            f"{tuple(text_image.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    images, texts = itc.shape
    i2t = torch.full((images,), float(texts))
    for i in range(images):
        order = _reranked(itc[i], k, lambda cand, i=i: itm(torch.full_like(cand, i), cand))
        truth = (text_image[order] == i).nonzero()
        i2t[i] = truth[0, 0] if len(truth) else texts
    t2i = torch.full((texts,), float(images))
    for t in range(texts):
        order = _reranked(itc[:, t], k, lambda cand, t=t: itm(cand, torch.full_like(cand, t)))
        t2i[t] = (order == text_image[t]).nonzero()[0, 0]
    return {"i2t": i2t, "t2i": t2i}


def _reranked(
    scores: torch.Tensor, k: int, itm: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """All candidates in order: the ITC top ``k`` re-ordered by ITM, then the rest."""
    order = scores.argsort(descending=True, stable=True)
    top = order[: min(k, len(order))]
    rescored = itm(top).flatten().float()
    if rescored.shape != top.shape:
        raise ValueError(f"itm returned {tuple(rescored.shape)} scores for {len(top)} pairs")
    return torch.cat([top[rescored.argsort(descending=True, stable=True)], order[len(top) :]])
