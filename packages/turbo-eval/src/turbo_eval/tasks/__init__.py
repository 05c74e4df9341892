"""Benchmark tasks. Importing this package registers the built-in kinds."""

from . import (  # noqa: F401  (registration)
    captioning,
    classification,
    fidelity,
    generation,
    knn,
    text_retrieval,
    visual_qa,
    vl_retrieval,
)
from .base import TASK_KINDS, Progress, Task, register_task

__all__ = ["TASK_KINDS", "Progress", "Task", "register_task"]
