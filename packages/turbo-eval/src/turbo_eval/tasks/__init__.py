"""Benchmark tasks. Importing this package registers the built-in kinds."""

from . import classification, fidelity, generation, knn, text_retrieval  # noqa: F401  (registration)
from .base import TASK_KINDS, Progress, Task, register_task

__all__ = ["TASK_KINDS", "Progress", "Task", "register_task"]
