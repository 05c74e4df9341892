"""Vision-language metrics against hand-computed cases, slow oracles and real easy-VQA data."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("turbo_eval")

from turbo_eval.vl_metrics import (
    caption_scores,
    itm_rerank_recall,
    normalize_answer,
    strip_punctuation,
    vqa_accuracy,
)


# each case worked by hand from the official evaluation's rules (vqaEval.py)
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # number words to digits
        ("None", "0"),
        ("the red Circle.", "red circle"),  # articles dropped, a final period removed
        ("  A dog!  ", "dog!"),  # "!" is not among the official marks
        ("yes,", "yes"),  # a mark touching nothing becomes a space
        ("yes, it is", "yes it is"),  # a mark touching a space vanishes
        ("1,000", "1000"),  # a digit-comma-digit number: every mark vanishes
        ("1,000 cats, 2 dogs", "1000 cats 2 dogs"),
        ("10, 20", "10 20"),
        ("2.5", "2.5"),  # a period before a digit stays
        ("3.14.", "3.14"),
        ("a.m.", "am"),
        ("(red)", "red"),
        ("t-shirt", "t-shirt"),  # "-" is not among the official marks
        ("don't", "don t"),  # the apostrophe is a mark: a space, then two words
        ("dont know", "don't know"),  # an apostrophe-less contraction is restored
        ("whats up", "what's up"),
        ("its lets im", "its lets im"),  # words, not contractions the table reaches
        ("line\nbreak\tand tab", "line break and tab"),
    ],
)
def test_answer_normalisation_follows_the_official_rules(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_punctuation_step_alone_keeps_case_and_words() -> None:
    assert strip_punctuation("Two Dogs, (brown)") == "Two Dogs brown "
    assert strip_punctuation("1,000.") == "1000"


def _official(prediction: str, humans: list[str]) -> float:
    """The score as the official loop computes it: leave each annotator out in turn; the
    human answers get the punctuation step only, and only when they disagree."""
    guess = normalize_answer(prediction)
    if len(set(humans)) > 1:
        humans = [strip_punctuation(a) for a in humans]
    scores = []
    for left_out in range(len(humans)):
        others = humans[:left_out] + humans[left_out + 1 :]
        scores.append(min(1.0, sum(a == guess for a in others) / 3))
    return sum(scores) / len(scores)


def test_vqa_accuracy_matches_the_official_loop() -> None:
    # human answers are compared as given: "two" is not a "2" (VQAv2's are normalised)
    humans = ["2"] * 3 + ["two"] + ["3"] * 4 + ["4", "5"]
    cases = (("2", 0.9), ("two", 0.9), ("3", 1.0), ("4", 0.3), ("6", 0.0))
    for guess, expected in cases:
        assert vqa_accuracy([guess], [humans]) == pytest.approx(_official(guess, humans))
        assert vqa_accuracy([guess], [humans]) == pytest.approx(expected)
    two = ["x", "x"] + ["y"] * 8
    assert vqa_accuracy(["x"], [two]) == pytest.approx(0.6)
    assert vqa_accuracy(["x", "y"], [two, two]) == pytest.approx(0.8)
    commas = ["yes, it is"] * 3 + ["no"] * 7  # disagreeing answers get the punctuation step
    assert vqa_accuracy(["yes it is"], [commas]) == pytest.approx(0.9)  # 3 of 10 agree
    assert _official("yes it is", commas) == pytest.approx(0.9)
    # ... which leaves a space where a mark touched nothing: the official "yes," is "yes "
    trailing = ["yes,"] * 3 + ["no"] * 7
    assert vqa_accuracy(["yes"], [trailing]) == _official("yes", trailing) == 0.0
    assert vqa_accuracy(["circle"], [["circle"]]) == 1.0  # one answer: a match scores 1
    assert vqa_accuracy(["circle"], [["Circle"]]) == 0.0  # unanimous answers are not touched
    with pytest.raises(ValueError, match="one entry per question"):
        vqa_accuracy(["x"], [])
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy(["x"], [[]])


def test_caption_scores_rank_the_closer_caption_higher() -> None:
    references = {
        "1": ["a cat sits on a red mat", "a cat on the mat", "the cat is sitting on a mat"],
        "2": ["a dog runs through the park", "a brown dog running on grass"],
    }
    exact = caption_scores(
        {"1": "a cat sits on a red mat", "2": "a dog runs through the park"},
        references,
        meteor=False,
    )
    wrong = caption_scores(
        {"1": "a plane in the sky", "2": "two people at a table"}, references, meteor=False
    )
    assert exact["bleu4"] > 0.9 and exact["cider"] > wrong["cider"]
    assert wrong["bleu4"] < 0.1
    with pytest.raises(ValueError, match="no reference captions"):
        caption_scores({"3": "a cat"}, references)


def _slow_recall(itc, text_image, itm_matrix, k, ks):
    """Brute force: every query's full ranking written out with Python sorting."""
    images, texts = itc.shape
    out = {}
    ranks_i2t = []
    for i in range(images):
        order = sorted(range(texts), key=lambda t: (-float(itc[i, t]), t))
        top, rest = order[:k], order[k:]
        top = sorted(top, key=lambda t: (-float(itm_matrix[i, t]), top.index(t)))
        ranks_i2t.append(min(r for r, t in enumerate(top + rest) if int(text_image[t]) == i))
    ranks_t2i = []
    for t in range(texts):
        order = sorted(range(images), key=lambda i: (-float(itc[i, t]), i))
        top, rest = order[:k], order[k:]
        top = sorted(top, key=lambda i: (-float(itm_matrix[i, t]), top.index(i)))
        ranks_t2i.append((top + rest).index(int(text_image[t])))
    for name, ranks in (("i2t", ranks_i2t), ("t2i", ranks_t2i)):
        for cut in ks:
            out[f"{name}_r{cut}"] = sum(r < cut for r in ranks) / len(ranks)
    return out


@pytest.mark.parametrize(("seed", "k"), list(itertools.product(range(4), (1, 3, 50))))
def test_itm_rerank_recall_matches_brute_force(seed: int, k: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    images, per_image = 7, 3
    text_image = torch.arange(images).repeat_interleave(per_image)
    itc = torch.randn(images, images * per_image, generator=generator)
    itm_matrix = torch.randn(images, images * per_image, generator=generator)
    calls = []

    def itm(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        calls.append(len(image_idx))
        return itm_matrix[image_idx, text_idx]

    got = itm_rerank_recall(itc, text_image, itm, k=k, ks=(1, 5, 10))
    assert got == pytest.approx(_slow_recall(itc, text_image, itm_matrix, k, (1, 5, 10)))
    assert max(calls) <= k  # ITM only on each query's candidates


def test_perfect_itm_rescues_a_bad_itc_within_k() -> None:
    text_image = torch.arange(4)
    itc = -torch.eye(4)  # ITC puts every truth last
    itm = lambda i, t: (i == t).float()
    assert itm_rerank_recall(itc, text_image, itm, k=4)["i2t_r1"] == 1.0
    assert itm_rerank_recall(itc, text_image, itm, k=3)["i2t_r1"] == 0.0


def test_easy_vqa_loads_real_questions() -> None:
    pytest.importorskip("easy_vqa")
    from turbo_eval.assets.easy_vqa import load_easy_vqa

    items = load_easy_vqa("test", limit=20)
    assert len(items) == 20
    assert all(item.image.ndim == 3 and item.image.shape[-1] == 3 for item in items)
    assert all(item.question.endswith("?") and len(item.answers) == 10 for item in items)
    # the package's own answers score 1, a wrong one 0
    assert vqa_accuracy([i.answers[0] for i in items], [i.answers for i in items]) == 1.0
    assert vqa_accuracy(["no such answer"] * 20, [i.answers for i in items]) == 0.0
    with pytest.raises(ValueError, match="split must be one of"):
        load_easy_vqa("val")
