"""Metrics: top-1, kNN classification, retrieval recall, embedding fidelity (pure torch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "cosine_fidelity",
    "knn_classify",
    "knn_votes",
    "retrieval_ranks",
    "retrieval_recall",
    "top1_accuracy",
]


def top1_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``predicted`` class ids (or ``(N, C)`` scores) equal to ``labels``."""
    if predicted.dim() == 2:
        predicted = predicted.argmax(dim=-1)
    if predicted.shape != labels.shape:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and labels {tuple(labels.shape)} "
            "must have the same length"
        )
    if labels.numel() == 0:
        raise ValueError("labels must not be empty")
    return float((predicted.cpu() == labels.cpu()).float().mean())


def knn_classify(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    k: int = 20,
    num_classes: int | None = None,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted class per test row: cosine kNN with DINO's weighted vote.

    Each of the ``k`` nearest train features votes for its class with weight
    ``exp(cos / temperature)``; the class with the largest total wins (ties: lowest id).
    """
    votes = knn_votes(train, train_labels, test, k, num_classes, temperature, chunk)
    return votes.argmax(dim=-1)


def knn_votes(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    k: int = 20,
    num_classes: int | None = None,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """``(N_test, C)`` share of the weighted kNN vote each class gets (rows sum to 1)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if train.dim() != 2 or test.dim() != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train {tuple(train.shape)} and test {tuple(test.shape)} must be (N, D) "
            "matrices with the same D"
        )
    if train.shape[0] == 0 or train_labels.shape != (train.shape[0],):
        raise ValueError(
            f"train_labels {tuple(train_labels.shape)} must hold one label per train row "
            f"and train must not be empty (got {train.shape[0]} rows)"
        )
    if int(train_labels.min()) < 0:
        raise ValueError(f"train_labels must be >= 0, got {int(train_labels.min())}")
    highest = int(train_labels.max())
    num_classes = highest + 1 if num_classes is None else num_classes
    if num_classes <= highest:
        raise ValueError(f"num_classes must be > the largest label {highest}, got {num_classes}")
    k = min(k, train.shape[0])
    train_n = F.normalize(train.float(), dim=-1)
    labels = train_labels.to(train_n.device).long()
    out = []
    for start in range(0, test.shape[0], chunk):
        query = F.normalize(test[start : start + chunk].float(), dim=-1)
        similarity, index = (query @ train_n.T).topk(k, dim=-1)
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        # exp((cos - best) / T): the same ranking of classes as exp(cos / T) (a positive
        # factor per row) without overflowing float32 once T < 1/88.7
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        votes.scatter_add_(1, labels[index], weights)
        out.append(votes / votes.sum(dim=-1, keepdim=True))
    if not out:
        return torch.empty(0, num_classes, device=train.device)
    return torch.cat(out)


def retrieval_ranks(similarity: torch.Tensor) -> dict[str, torch.Tensor]:
    """0-based rank of the true match per query, both ways (``q2d`` rows, ``d2q`` columns).

    The rank counts the OTHER candidates scoring at least as high: ties count against
    the truth, so collapsed (identical) embeddings rank last, not first.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square, got {tuple(similarity.shape)}")
    if similarity.shape[0] == 0:
        raise ValueError("similarity must not be empty")
    if torch.isnan(similarity).any():
        raise ValueError("similarity must not contain NaN (a NaN true score would rank first)")
    truth = torch.arange(similarity.shape[0], device=similarity.device)
    ranks = {}
    for name, matrix in (("q2d", similarity), ("d2q", similarity.T)):
        true_score = matrix[truth, truth].unsqueeze(1)
        ranks[name] = (matrix >= true_score).sum(dim=1) - 1
    return ranks


def retrieval_recall(similarity: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways for a square query x document matrix whose diagonal is the truth.

    Keys: ``q2d_r{k}`` (row i finds column i among its top k) and ``d2q_r{k}``.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square, got {tuple(similarity.shape)}")
    if similarity.shape[0] == 0:
        raise ValueError("similarity must not be empty")
    if torch.isnan(similarity).any():
        raise ValueError("similarity must not contain NaN (a NaN true score would rank first)")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be non-empty and every k >= 1, got {tuple(ks)}")
    n = similarity.shape[0]
    truth = torch.arange(n, device=similarity.device)
    result = {}
    for name, matrix in (("q2d", similarity), ("d2q", similarity.T)):
        # rank of the true match: how many OTHER candidates score at least as high.
        # Ties count against the truth, so collapsed (identical) embeddings score 0,
        # not a perfect recall.
        true_score = matrix[truth, truth].unsqueeze(1)
        rank = (matrix >= true_score).sum(dim=1) - 1
        for k in ks:
            result[f"{name}_r{k}"] = float((rank < k).float().mean())
    return result


def cosine_fidelity(features: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean and minimum cosine between matching rows of two embedding sets."""
    if features.shape != reference.shape:
        raise ValueError(
            f"features {tuple(features.shape)} and reference {tuple(reference.shape)} must match"
        )
    if features.dim() == 0 or features.numel() == 0:
        raise ValueError(f"features must hold at least one row, got {tuple(features.shape)}")
    cosine = F.cosine_similarity(features.float(), reference.float(), dim=-1)
    return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min())}
