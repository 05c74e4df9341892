"""The task interface: what every benchmark task provides to the runner.

A task loads its data once (``prepare``), then ``evaluate`` is called once per
(method, r) with the model already configured for that method. Tasks for later
model families (captioning, VQA, retrieval, generation) implement the same class
and register with :func:`register_task`; nothing else in turbo-eval changes.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from ..loaded_model import LoadedModel

__all__ = ["TASK_KINDS", "Progress", "Task", "register_task"]

#: A progress callback factory: ``progress(iterable, description) -> iterable``.
Progress = Callable[[Any, str], Any]


class Task(abc.ABC):
    """Base class of a benchmark task.

    Class attributes:
        kind: the name suites use (``kind = "knn"``).
        metric: the headline metric (higher is better), shown in tables and plots.
        item_score: the per-item column (in ``evaluate()["items"]``) whose mean is
            ``metric``; paired intervals between methods are computed on it.
        options: allowed option names with their expected types and defaults.
    """

    kind: ClassVar[str] = ""
    metric: ClassVar[str] = ""
    item_score: ClassVar[str] = ""
    modality: ClassVar[str] = "image"
    options: ClassVar[Mapping[str, tuple[type, Any]]] = {}

    def __init__(
        self,
        options: Mapping[str, Any],
        model: LoadedModel,
        seed: int,
        batch_size: int,
        quick: bool = False,
    ) -> None:
        self.config = {key: options.get(key, default) for key, (_, default) in self.options.items()}
        self.name = str(options.get("name", self.kind))
        self.model = model
        self.seed = seed
        self.batch_size = batch_size
        self.quick = quick

    @classmethod
    def validate(cls, options: Mapping[str, Any]) -> list[tuple[str | None, str]]:
        """Problems with a suite's options for this task: ``(key, message)`` pairs."""
        problems: list[tuple[str | None, str]] = []
        for key, value in options.items():
            if key == "name":
                continue
            if key not in cls.options:
                from ..names import nearest

                problems.append(
                    (
                        key,
                        f"unknown option for {cls.kind!r}{nearest(key, cls.options)}; "
                        f"allowed: {sorted(cls.options)}",
                    )
                )
                continue
            kind = cls.options[key][0]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                continue
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                problems.append((key, f"must be {kind.__name__}, got {value!r}"))
            elif kind in (int, float) and value < 0:
                problems.append((key, f"must be >= 0, got {value!r}"))
        return problems

    @abc.abstractmethod
    def prepare(self, progress: Progress) -> dict[str, Any]:
        """Load data; return facts for the results file (dataset name, sizes)."""

    @abc.abstractmethod
    def evaluate(self, progress: Progress) -> dict[str, Any]:
        """Metrics of the model as currently configured; must include ``self.metric``.

        May hold ``"items"``: per-item results as ``{column: [one value per item]}``
        in a fixed item order (correct or not, cosine, rank, score), with the column
        ``item_score`` among them; the runner stores them with the cell.
        """

    @abc.abstractmethod
    def speed_items(self) -> Sequence[Any]:
        """A representative batch of raw items for throughput and FLOPs."""

    def batched_features(self, items: Sequence[Any], progress: Progress, label: str) -> Any:
        """Features of ``items`` in batches (spread over ranks when distributed).

        The unpatched model's features are cached per ``label``: the baseline is
        computed once per task however often it is asked for.
        """
        from ..distributed import map_batches

        # the dense model without Turbo (not a quantized or pruned copy of it)
        unpatched = self.model.handle is None and getattr(self.model, "is_dense", True)
        cache: dict[str, Any] = self.__dict__.setdefault("_baseline_features", {})
        if unpatched and label in cache:
            return cache[label]
        features = map_batches(items, self.batch_size, self.model.features, progress, label)
        if unpatched:
            cache[label] = features
        return features


TASK_KINDS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task kind."""
    if not cls.kind or cls.kind in TASK_KINDS:
        raise ValueError(f"task kind {cls.kind!r} is empty or already registered")
    TASK_KINDS[cls.kind] = cls
    return cls
