"""Text-to-text retrieval: WordNet definitions <-> the words they define."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from .base import Progress, Task, register_task


@register_task
class TextRetrievalTask(Task):
    """Recall@k both ways between definitions and their words (one true pair each).

    The pairs come from Debian's ``wordnet-base`` (noun glosses), a real corpus that
    installs offline; the retrieval is the text analogue of the paper's image-text
    retrieval (Flickr30k/COCO R@1).
    """

    kind = "text-retrieval"
    metric = "r1_mean"
    item_score = "r1_hit"
    modality = "text"
    options: ClassVar[dict[str, tuple[type, Any]]] = {"pairs": (int, 1000)}

    def prepare(self, progress: Progress) -> dict[str, Any]:
        from ..assets.text import load_definition_pairs

        pairs = load_definition_pairs(limit=int(self.config["pairs"]), seed=self.seed)
        # sort by length so batches carry little padding
        pairs = sorted(pairs, key=lambda p: (len(p[1]), p[1]))
        self.words = [w for w, _ in pairs]
        self.definitions = [d for _, d in pairs]
        return {"pairs": len(pairs), "corpus": "wordnet nouns"}

    def evaluate(self, progress: Progress) -> dict[str, Any]:
        from ..metrics import retrieval_ranks, retrieval_recall

        definitions = self.batched_features(self.definitions, progress, "definition embeddings")
        words = self.batched_features(self.words, progress, "word embeddings")
        similarity = definitions @ words.T
        recalls = retrieval_recall(similarity, ks=(1, 5))
        ranks = retrieval_ranks(similarity)
        # per pair: the mean of its two R@1 hits, so the items average to r1_mean
        hit = ((ranks["q2d"] == 0).float() + (ranks["d2q"] == 0).float()) / 2
        return {
            **recalls,
            "r1_mean": (recalls["q2d_r1"] + recalls["d2q_r1"]) / 2,
            "items": {
                "r1_hit": hit.tolist(),
                "rank_q2d": ranks["q2d"].tolist(),
                "rank_d2q": ranks["d2q"].tolist(),
            },
        }

    def speed_items(self) -> Sequence[Any]:
        # definitions are sorted by length: take them evenly spread, not the shortest
        step = max(1, len(self.definitions) // 16)
        return self.definitions[step // 2 :: step]
