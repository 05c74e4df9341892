"""Vision-language metrics: VQAv2 accuracy, captioning scores, retrieval with ITM re-ranking.

- :func:`vqa_accuracy`: the VQAv2 soft score (an answer is fully right when at least 3
  of the annotators gave it), averaged over the leave-one-annotator-out subsets, with
  the official evaluation's answer rules (:func:`normalize_answer`); the one VQA metric
  of the project.
- :func:`answer_agreement` and :func:`first_token_kl`: fidelity of a patched generator
  to the unpatched one.
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
    "answer_agreement",
    "caption_scores",
    "cider_per_image",
    "first_token_kl",
    "itm_rerank_ranks",
    "itm_rerank_recall",
    "normalize_answer",
    "strip_punctuation",
    "vqa_accuracy",
]

# The official VQA evaluation's answer rules (the VQA challenge's vqaEval.py), in our words:
# number words 0-10 to digits, articles dropped, contractions written without their
# apostrophe restored. Only the contractions its table can reach from lower-case text are
# listed ("lets", "its" and "im" stay words), each with the straight apostrophe (its table
# mixes straight and typographic ones, an artefact no human answer depends on).
_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    )
} | {"none": "0"}
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTED = [
    "ain't",
    "aren't",
    "can't",
    "could've",
    "couldn't",
    "didn't",
    "doesn't",
    "don't",
    "hadn't",
    "hasn't",
    "haven't",
    "he'd",
    "he's",
    "how'd",
    "how'll",
    "how's",
    "isn't",
    "it'd",
    "it'll",
    "ma'am",
    "mightn't",
    "might've",
    "mustn't",
    "must've",
    "needn't",
    "not've",
    "o'clock",
    "oughtn't",
    "shan't",
    "should've",
    "shouldn't",
    "somebody'll",
    "somebody's",
    "someone'd",
    "someone'll",
    "someone's",
    "something'd",
    "something'll",
    "that's",
    "there'd",
    "there're",
    "there's",
    "they'd",
    "they'll",
    "they're",
    "they've",
    "'twas",
    "wasn't",
    "we've",
    "weren't",
    "what'll",
    "what're",
    "what's",
    "what've",
    "when's",
    "where'd",
    "where's",
    "where've",
    "who'd",
    "who'll",
    "who's",
    "who've",
    "why'll",
    "why're",
    "why's",
    "won't",
    "would've",
    "wouldn't",
    "y'all",
    "you'd",
    "you'll",
    "you're",
    "you've",
]
_CONTRACTIONS = {word.replace("'", ""): word for word in _CONTRACTED}
# marks that become a space, or vanish when they touch a space or the text holds a
# digit-comma-digit number ("1,000" -> "1000"); "-" and "!" are not among them
_PUNCTUATION = (
    ";",
    ":",
    "/",
    "'",
    "[",
    "]",
    '"',
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
)
_DIGIT_COMMA = re.compile(r"\d,\d")
# a period is dropped unless a digit follows ("2.5" stays; the official pattern's
# look-behind is malformed, so a digit before the period does not protect it)
_LONE_PERIOD = re.compile(r"\.(?!\d)")


def strip_punctuation(answer: str) -> str:
    """The official evaluation's punctuation step (applied to every answer it compares)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    glued = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if glued or touches_space else " ")
    return _LONE_PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official VQA evaluation compares it.

    Punctuation (:func:`strip_punctuation`), then lower case, number words to digits,
    articles dropped and apostrophe-less contractions restored.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    words = [_NUMBER_WORDS.get(w, w) for w in strip_punctuation(answer).lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy of ``predictions`` against each question's human answers.

    As the official evaluation: the prediction is normalised (:func:`normalize_answer`);
    the human answers are taken as the data set gives them (VQAv2's are normalised
    already), with only the punctuation step when they disagree. For one question with
    n human answers of which m equal the prediction, the score is the mean over the n
    leave-one-out subsets of ``min(1, matches / 3)``: with 10 answers, 3 matches score 1,
    2 score 0.6, 1 scores 0.3. A single human answer scores 1 on a match.
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
        if len(set(humans)) > 1:
            humans = [strip_punctuation(a) for a in humans]
        hits = [a == guess for a in humans]
        n, m = len(hits), sum(hits)
        if n == 1:
            total += float(m)
            continue
        # leaving out a matching answer leaves m - 1 matches, another one leaves m
        total += (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n
    return total / len(predictions)


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
