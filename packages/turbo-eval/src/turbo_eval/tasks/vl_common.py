"""What the vision-language tasks share: option checks, the headline rule, batching, KL."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..loaded_model import LoadedModel
from .base import Progress

__all__ = [
    "HEADLINES",
    "check_choice",
    "check_positive",
    "kl_rows",
    "map_indices",
    "require_vl_model",
    "uses_reference",
]

#: ``headline`` option: which metric a task reports as its headline
HEADLINES = ("auto", "fidelity", "reference")


def check_choice(
    options: Mapping[str, Any], key: str, allowed: Sequence[str]
) -> list[tuple[str | None, str]]:
    """A problem when ``options[key]`` (if given, and a str) is not one of ``allowed``."""
    value = options.get(key)
    if isinstance(value, str) and value not in allowed:
        return [(key, f"must be one of {list(allowed)}, got {value!r}")]
    return []


def check_positive(options: Mapping[str, Any], *keys: str) -> list[tuple[str | None, str]]:
    """Problems for ints given as 0 where at least 1 is needed."""
    return [
        (key, f"must be >= 1, got {options[key]!r}")
        for key in keys
        if isinstance(options.get(key), int) and not isinstance(options[key], bool)
        if options[key] < 1
    ]


def require_vl_model(model: LoadedModel, task: str, kind: str, purpose: str | None) -> Any:
    """The model as a :class:`~turbo_eval.vl.model.VLModel` that can do ``task``."""
    from ..vl import VLModel
    from ..vl.catalog import VL_ARCHITECTURES

    needs = "an image-text matching model" if kind == "match" else "a captioning or VQA model"
    classes = sorted(name for name, (_, head) in VL_ARCHITECTURES.items() if head.kind == kind)
    if not isinstance(model, VLModel):
        raise TypeError(
            f"task {task!r} needs {needs} ({', '.join(classes)}); {model.name!r} is a "
            f"{model.modality} feature model"
        )
    if model.kind != kind or (purpose is not None and purpose not in model.purposes()):
        raise TypeError(
            f"task {task!r} needs {needs} ({', '.join(classes)}) that answers {purpose!r} "
            f"texts; {model.name!r} is a {type(model.module).__name__}"
        )
    return model


def uses_reference(headline: str, model: Any, has_references: bool, option: str) -> bool:
    """Whether the headline is the reference metric (accuracy, CIDEr, recall).

    ``auto``: when the model has pretrained weights and the data has references;
    with random weights the headline is fidelity to the unpatched model.

    Raises:
        ValueError: ``headline = "reference"`` without references in the data.
    """
    if headline == "reference" and not has_references:
        raise ValueError(
            f"headline = 'reference' needs data with references; give {option} (or use "
            "headline = 'fidelity')"
        )
    if headline == "auto":
        return has_references and model.weights == "pretrained"
    return headline == "reference"


def map_indices(
    count: int,
    batch_size: int,
    fn: Callable[[list[int]], torch.Tensor],
    progress: Progress,
    label: str,
) -> torch.Tensor:
    """``fn`` over batches of item indices (spread over ranks when distributed)."""
    from ..distributed import map_batches

    return map_batches(list(range(count)), batch_size, fn, progress, label)


def kl_rows(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || patched) of each row's next-token distribution, ``(...,)``."""
    ref = reference.float().log_softmax(-1)
    out = logits.float().log_softmax(-1)
    return (ref.exp() * (ref - out)).sum(-1).clamp(min=0.0)
