"""Metrics against slow loop oracles and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("turbo_eval")

from turbo_eval.metrics import cosine_fidelity, knn_classify, retrieval_recall, top1_accuracy


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _knn_oracle(train, labels, test, k, num_classes, temperature):
    """Per test row: every cosine, the k largest, exp(cos/T) votes, argmax (lowest id wins).

    Also returns, per row, the relative gap between the two best class totals, so that
    near-ties (where float32 and float64 may legitimately disagree) can be recognised.
    """
    train, test, labels = train.double().tolist(), test.double().tolist(), labels.tolist()
    predictions, gaps = [], []
    for row in test:
        scored = sorted(
            ((_cos(row, t), i) for i, t in enumerate(train)), key=lambda s: s[0], reverse=True
        )
        votes = [0.0] * num_classes
        for cosine, i in scored[:k]:
            votes[labels[i]] += math.exp(cosine / temperature)
        best = max(votes)
        predictions.append(votes.index(best))  # index() returns the lowest id among ties
        ranked = sorted(votes, reverse=True)
        gaps.append((ranked[0] - ranked[1]) / ranked[0] if len(ranked) > 1 else 1.0)
    return predictions, gaps


def _assert_matches_oracle(train, labels, test, k, num_classes, temperature, chunk):
    got = knn_classify(train, labels, test, k, num_classes, temperature, chunk)
    want, gaps = _knn_oracle(train, labels, test, min(k, len(train)), num_classes, temperature)
    assert got.dtype == torch.long and got.shape == (len(test),)
    for row, (g, w, gap) in enumerate(zip(got.tolist(), want, gaps, strict=True)):
        # float32 vs float64: only a near-tie between the best two classes may differ
        assert g == w or gap < 1e-5, f"row {row}: got {g}, oracle {w} (gap {gap})"


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_train=st.integers(1, 30),
    n_test=st.integers(1, 12),
    dim=st.integers(2, 6),  # in 1-D every cosine is +-1: ties at the k-th place
    num_classes=st.integers(1, 5),
    k=st.integers(1, 35),
    temperature=st.sampled_from([0.005, 0.07, 0.5, 3.0]),
    chunk=st.integers(1, 8),
)
def test_knn_classify_matches_loop_oracle(
    seed, n_train, n_test, dim, num_classes, k, temperature, chunk
):
    gen = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=gen)
    test = torch.randn(n_test, dim, generator=gen)
    labels = torch.randint(0, num_classes, (n_train,), generator=gen)
    _assert_matches_oracle(train, labels, test, k, num_classes, temperature, chunk)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_classify_default_arguments_on_clustered_data(seed):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=gen) * 3
    labels = torch.randint(0, 4, (200,), generator=gen)
    train = centres[labels] + torch.randn(200, 16, generator=gen)
    test_labels = torch.randint(0, 4, (40,), generator=gen)
    test = centres[test_labels] + torch.randn(40, 16, generator=gen)
    _assert_matches_oracle(train, labels, test, 20, 4, 0.07, 1024)
    # and it is a working classifier
    got = knn_classify(train, labels, test)
    assert top1_accuracy(got, test_labels) > 0.8


def test_knn_tie_goes_to_the_lowest_class_id():
    # two train rows at the same cosine (both at 45 degrees) with different labels
    train = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    test = torch.tensor([[1.0, 0.0]])
    assert knn_classify(train, torch.tensor([3, 1]), test, k=2).tolist() == [1]
    assert knn_classify(train, torch.tensor([1, 3]), test, k=2).tolist() == [1]


def test_knn_weights_favour_close_neighbours():
    # class 0: one very close neighbour; class 1: two far ones. A low temperature
    # lets the close one win; a high temperature makes it a plain majority vote.
    train = torch.tensor([[1.0, 0.05], [0.3, 1.0], [0.3, -1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    assert knn_classify(train, labels, test, k=3, temperature=0.07).tolist() == [0]
    assert knn_classify(train, labels, test, k=3, temperature=100.0).tolist() == [1]


def test_knn_small_temperature_does_not_overflow():
    # exp(cos / 0.001) overflows: classes 1 and 2 would both total inf and 1 would win
    train = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]])
    labels = torch.tensor([2, 1, 0])
    test = torch.tensor([[1.0, 0.01]])
    assert knn_classify(train, labels, test, k=3, temperature=0.001).tolist() == [2]


def test_knn_scale_invariant_and_empty_test():
    gen = torch.Generator().manual_seed(5)
    train, test = torch.randn(20, 4, generator=gen), torch.randn(6, 4, generator=gen)
    labels = torch.randint(0, 3, (20,), generator=gen)
    base = knn_classify(train, labels, test, k=5)
    assert torch.equal(knn_classify(train * 7, labels, test * 0.1, k=5), base)
    assert torch.equal(knn_classify(train.double(), labels, test.half().float(), k=5), base)
    assert knn_classify(train, labels, test[:0], k=5).shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"chunk": 0}, "chunk"),
        ({"num_classes": 2}, "num_classes"),
        ({"test": torch.ones(2, 5)}, "same D"),
        ({"test": torch.ones(4)}, "same D"),
        ({"train_labels": torch.tensor([0, 1])}, "one label per train row"),
        ({"train_labels": torch.tensor([0, -1, 2])}, ">= 0"),
        ({"train": torch.ones(0, 4), "train_labels": torch.ones(0, dtype=torch.long)}, "empty"),
    ],
)
def test_knn_bad_inputs_raise(kwargs, match):
    args = {
        "train": torch.ones(3, 4),
        "train_labels": torch.tensor([0, 1, 2]),
        "test": torch.ones(2, 4),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        knn_classify(**args)


def test_top1_accuracy_ids_and_scores():
    labels = torch.tensor([0, 1, 2, 1])
    assert top1_accuracy(torch.tensor([0, 1, 0, 0]), labels) == pytest.approx(0.5)
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])
    assert top1_accuracy(scores, labels) == pytest.approx(0.75)
    assert top1_accuracy(labels, labels) == 1.0


def test_top1_accuracy_bad_inputs_raise():
    with pytest.raises(ValueError, match="same length"):
        top1_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="same length"):
        top1_accuracy(torch.zeros(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="empty"):
        top1_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


def _recall_oracle(matrix: list[list[float]], k: int) -> float:
    """Row i is a hit when fewer than k other columns score at least as high as column i."""
    hits = 0
    for i, row in enumerate(matrix):
        above = sum(1 for j, value in enumerate(row) if j != i and value >= row[i])
        hits += above < k
    return hits / len(matrix)


def test_retrieval_recall_hand_computed():
    # rows are queries, columns documents; the diagonal is the truth
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # q0: truth first
            [0.8, 0.5, 0.1],  # q1: one document (d0) above the truth -> rank 1
            [0.7, 0.6, 0.3],  # q2: two above -> rank 2
        ]
    )
    got = retrieval_recall(sim, ks=(1, 2, 3))
    assert got["q2d_r1"] == pytest.approx(1 / 3)
    assert got["q2d_r2"] == pytest.approx(2 / 3)
    assert got["q2d_r3"] == pytest.approx(1.0)
    # columns: d0 -> queries (0.9, 0.8, 0.7): truth first; d1 -> (0.1, 0.5, 0.6): q2 above;
    # d2 -> (0.2, 0.1, 0.3): truth first
    assert got["d2q_r1"] == pytest.approx(2 / 3)
    assert got["d2q_r2"] == pytest.approx(1.0)
    assert got["d2q_r3"] == pytest.approx(1.0)
    assert set(got) == {f"{d}_r{k}" for d in ("q2d", "d2q") for k in (1, 2, 3)}


def test_retrieval_recall_ties_count_against_the_truth():
    # collapsed embeddings (everything ties) must not look like perfect retrieval
    assert retrieval_recall(torch.ones(4, 4), ks=(1, 4)) == {
        "q2d_r1": 0.0,
        "q2d_r4": 1.0,
        "d2q_r1": 0.0,
        "d2q_r4": 1.0,
    }
    # row 0: one tie and one strictly higher -> rank 2 (a miss at k=2, a hit at k=3)
    sim = torch.tensor([[0.5, 0.5, 0.6], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    got = retrieval_recall(sim, ks=(1, 2, 3))
    assert got["q2d_r1"] == pytest.approx(2 / 3)
    assert got["q2d_r2"] == pytest.approx(2 / 3)
    assert got["q2d_r3"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_recall_matches_oracle_on_random_and_tied_matrices(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 12
    # integer scores make ties frequent
    sim = torch.randint(0, 4, (n, n), generator=gen).float()
    got = retrieval_recall(sim, ks=(1, 3, 5))
    for k in (1, 3, 5):
        assert got[f"q2d_r{k}"] == pytest.approx(_recall_oracle(sim.tolist(), k))
        assert got[f"d2q_r{k}"] == pytest.approx(_recall_oracle(sim.T.tolist(), k))


def test_retrieval_recall_bad_inputs_raise():
    with pytest.raises(ValueError, match="square"):
        retrieval_recall(torch.ones(2, 3))
    with pytest.raises(ValueError, match="square"):
        retrieval_recall(torch.ones(3))
    with pytest.raises(ValueError, match="empty"):
        retrieval_recall(torch.ones(0, 0))
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(torch.eye(3), ks=(0,))
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(torch.eye(3), ks=())
    sim = torch.eye(3)
    sim[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(sim)


def test_cosine_fidelity_against_loop():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    cosines = [_cos(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    got = cosine_fidelity(a, b)
    assert got["cosine"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-6)
    assert got["cosine_min"] == pytest.approx(min(cosines), abs=1e-6)
    same = cosine_fidelity(a, a * 3)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    opposite = cosine_fidelity(a, -a)
    assert opposite["cosine"] == pytest.approx(-1.0, abs=1e-6)
    # half precision inputs are computed in float32
    assert cosine_fidelity(a.half(), b.half())["cosine"] == pytest.approx(got["cosine"], abs=1e-2)


def test_cosine_fidelity_bad_inputs_raise():
    with pytest.raises(ValueError, match="must match"):
        cosine_fidelity(torch.ones(3, 4), torch.ones(3, 5))
    with pytest.raises(ValueError, match="must match"):
        cosine_fidelity(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least one row"):
        cosine_fidelity(torch.ones(0, 4), torch.ones(0, 4))
